"""A candidate and the system it must beat, scored on the same cases: what the prompt and adapter flows gate on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadre.evaluation.results import EvaluationResult
    from cadre.prompts.optimize import EvaluationRun


@dataclass(frozen=True)
class TestScores:
    """Champion (or un-optimized baseline) and candidate program on the same test cases, plus retrieval-only.

    Attributes:
        baseline: the champion program, or the declared program before the first promotion.
        candidate: the compiled program.
        retrieval_only: the retriever's top-1 document as the answer (None: the program does not retrieve).
        baseline_is_champion: whether `baseline` is a promoted champion.
        costs: per system (`baseline`, `candidate`, `retrieval_only`), LM usage and `wall_seconds`.
    """

    __test__ = False  # not a pytest class

    baseline: EvaluationResult
    candidate: EvaluationResult
    retrieval_only: EvaluationResult | None
    baseline_is_champion: bool
    costs: dict[str, dict[str, float]]


@dataclass(frozen=True)
class AdapterScores:
    """Candidate and champion adapter (or the bare base model) on the same test cases."""

    candidate: EvaluationRun
    champion: EvaluationRun
    champion_is_adapter: bool
