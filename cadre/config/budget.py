"""The run budget: `full` (what `pipelines.yaml` declares) or `smoke` (the specialist's `smoke:` caps).

A budget is named once per run, where the run enters Cadre (the CLI's `--budget`, a flow's `budget`
parameter, a trigger), checked there with `parse_budget`, and turned into a frozen plan by one function per
stage; nothing else reads the name:

- re-index: `plan_reindex` (here: the document cap and the retrieval evaluation's case limit),
- optimize: `cadre.prompts.optimize.plan_optimization`,
- refresh: `cadre.tuning.finetune.plan_refresh`,
- feedback: `cadre.tuning.dpo.plan_feedback`.

A smoke plan also carries `smoke.max_wall_seconds`, the wall time of the stage's main work: the optimizer's
compile, the fine-tuning or DPO training loop, the re-index's embedding. Training stops at the first step past
it (saved, then evaluated as it is); a re-index stops reading documents and leaves its version an unfinished
build that can never go live and that the next re-index resumes. The run says so in the MLflow tag
`WALL_CAP_TAG`, which `cadre run` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from cadre.config import Specialist

RunBudget = Literal["smoke", "full"]
"""How much a run may spend: `smoke` (a quick check under the specialist's `smoke:` caps) or `full`."""

RUN_BUDGETS: tuple[RunBudget, ...] = get_args(RunBudget)

WALL_CAP_TAG = "cadre.wall_cap"
"""MLflow run tag: one sentence on where a smoke run stopped at its wall-time cap (absent when it did not)."""


def parse_budget(value: object) -> RunBudget:
    """`value` as a run budget.

    Raises:
        ValueError: it is not `smoke` or `full` (the message names both).
    """
    if value not in RUN_BUDGETS:
        raise ValueError(f"unknown budget {value!r}; expected 'smoke' or 'full'")
    return value  # type: ignore[return-value]


SMOKE_TRAIN_CASES = 16
"""Train cases a smoke optimization shows the optimizer."""
SMOKE_DEV_CASES = 8
"""Dev cases a smoke optimization selects and chooses the answer mode on."""


@dataclass(frozen=True)
class ReindexPlan:
    """What one re-index may use.

    Attributes:
        budget: the run's budget.
        max_documents: documents read from the sources (None: all).
        eval_cases: test cases the retrieval gate compares on (None: the whole split).
        max_wall_seconds: wall time of the build (reading, chunking, embedding); None: no cap.
        first_cases: under a document cap, how many leading cases of each suite split have their relevant
            documents read before any other case's: the cases the smoke cycle evaluates (empty: test, then dev).
        refresh_cases: under a document cap, how many train cases the smoke refresh reads (in its own order,
            `cadre.tuning.training_data.read_first`) have their documents read next.
    """

    budget: RunBudget
    max_documents: int | None
    eval_cases: int | None
    max_wall_seconds: float | None = None
    first_cases: dict[str, int] = field(default_factory=dict)
    refresh_cases: int = 0


def plan_reindex(specialist: Specialist, budget: RunBudget) -> ReindexPlan:
    """`full` reads `index.max_documents` and `evaluation.max_cases`; `smoke` the specialist's `smoke` caps.

    A smoke index holds first the documents of the cases a smoke cycle answers: the test cases its evaluations
    and edge export use, the dev cases its optimizer and refresh choose on, and the train cases its optimizer shows
    as demos (only a case whose answer was retrieved becomes one), then the train cases the refresh reads (twice
    the examples its steps need, in its own stable order; a program answering one of its candidates trains only on
    cases whose answer the index holds). So `smoke.max_documents` can be small without leaving a judged or trained
    case unanswerable."""
    from cadre.tuning.finetune import plan_refresh  # here: the refresh's plan imports this module

    budget = parse_budget(budget)
    if budget == "smoke":
        smoke = specialist.smoke
        first = {
            "test": max(smoke.max_eval_cases, specialist.edge.cases),
            "dev": max(SMOKE_DEV_CASES, smoke.decoding_dev_cases),
            "train": SMOKE_TRAIN_CASES,
        }
        return ReindexPlan(
            budget,
            smoke.max_documents,
            smoke.max_eval_cases,
            wall_seconds(specialist, budget),
            first_cases=first,
            refresh_cases=2 * (plan_refresh(specialist, budget).max_examples or 0),
        )
    return ReindexPlan(budget, specialist.index.max_documents, specialist.evaluation.max_cases)


def wall_seconds(specialist: Specialist, budget: RunBudget) -> float | None:
    """The wall-time cap of a stage's main work: `smoke.max_wall_seconds` under `smoke`, none under `full`."""
    return float(specialist.smoke.max_wall_seconds) if parse_budget(budget) == "smoke" else None
