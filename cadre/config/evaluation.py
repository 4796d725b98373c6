"""Evaluation suites and the gates a candidate must pass before it is promoted."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cadre.config.base import ExistingProjectPath, FieldError, Strict
from cadre.stages import GATE_KINDS, RETRIEVAL_GATE_KINDS

ANSWER_METRICS = ("exact_match", "token_f1", "rouge_l", "icd_hierarchy")
RUNTIME_METRICS = ("latency_p50_ms", "latency_p95_ms", "lm_calls", "tokens_per_case", "cost_usd")
_RETRIEVAL = re.compile(r"^(recall@\d+|hit@\d+|ndcg@\d+|mrr)$")


def check_retrieval_metric(name: str) -> str:
    if not _RETRIEVAL.match(name):
        raise ValueError(f"unknown retrieval metric {name!r}; expected recall@K, hit@K, ndcg@K or mrr")
    return name


def check_answer_metric(name: str) -> str:
    if name not in ANSWER_METRICS:
        raise ValueError(f"unknown answer metric {name!r}; expected one of {', '.join(ANSWER_METRICS)}")
    return name


class EvaluationSettings(Strict):
    """The specialist's evaluation suite: a folder of train/dev/test JSONL splits, and the metrics computed on it."""

    suite: ExistingProjectPath = Field(
        description="Folder holding train.jsonl, dev.jsonl and test.jsonl (e.g. evals/suites/icd10-coder)."
    )
    retrieval_metrics: list[str] = Field(["recall@10", "mrr", "ndcg@10"], description="Metrics of the retrieval stage.")
    answer_metrics: list[str] = Field(
        ["exact_match", "token_f1"], description=f"Metrics of the answers; any of {', '.join(ANSWER_METRICS)}."
    )
    max_cases: int | None = Field(None, gt=0, description="Cap on test cases per evaluation (null = the whole split).")
    retrieval_answer: Literal["id", "title"] = Field(
        "id",
        description=(
            "What the retrieval-only reference answers with: the first retrieved document's `id` (a lookup or a "
            "label, e.g. a code), or its `title` (a generative specialist whose documents are solved examples, "
            "e.g. a known word's pronunciation: the nearest example's answer is the baseline to beat)."
        ),
    )
    train_cases_in_corpus: bool = Field(
        False,
        description=(
            "The suite's train cases are documents of the specialist's corpus, under their case ids (e.g. the "
            "pronouncer: every train word is a known word of its index). A train case then never retrieves its own "
            "document, in the refresh's training prompts and the optimizer's demos alike: a served request never "
            "finds its own answer written down, and a model trained on prompts that hold it learns only to copy."
        ),
    )
    bootstrap_samples: int = Field(
        1000, ge=100, le=100_000, description="Bootstrap resamples for confidence intervals."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")

    @field_validator("retrieval_metrics")
    @classmethod
    def _known_retrieval(cls, names: list[str]) -> list[str]:
        return [check_retrieval_metric(n) for n in names]

    @field_validator("answer_metrics")
    @classmethod
    def _known_answer(cls, names: list[str]) -> list[str]:
        return [check_answer_metric(n) for n in names]


_RULE_KINDS = ("at_least", "at_most", "beat_champion_by", "max_slice_drop", "beat_baseline")
BASELINES = ("retrieval",)
"""Reference systems a `beat_baseline` rule can name: `retrieval` answers with the first retrieved document's id
(or its title: `evaluation.retrieval_answer`)."""


class GateRule(Strict):
    """One rule. Give `metric` and exactly one of at_least, at_most, beat_champion_by, max_slice_drop, beat_baseline."""

    metric: str = Field(description="Metric the rule reads, e.g. recall@10, exact_match, latency_p95_ms.")
    at_least: float | None = Field(None, description="Absolute minimum of the candidate's score.")
    at_most: float | None = Field(None, description="Absolute maximum (latency, cost, LM calls).")
    beat_champion_by: float | None = Field(
        None,
        description="Candidate must exceed the champion by at least this much (skipped when there is no champion).",
    )
    significant: bool = Field(
        False,
        description=(
            "With beat_champion_by: the bootstrap interval of the gain must lie above it. With max_slice_drop: a slice fails only if "
            "its drop is also significant (paired interval of the drop above zero, level corrected for the number of slices)."
        ),
    )
    max_slice_drop: float | None = Field(
        None, ge=0.0, description="No slice may fall more than this below the champion."
    )
    beat_baseline: Literal["retrieval"] | None = Field(
        None,
        description=(
            "The candidate must beat this reference system on the same test cases, by at least `margin` (paired "
            "bootstrap; with `significant` the interval's lower bound must exceed it). `retrieval`: the first "
            "retrieved document's id (or title, see `evaluation.retrieval_answer`) as the answer (program gates "
            "of a retrieving program)."
        ),
    )
    margin: float = Field(
        0.0,
        description="With beat_baseline: the gain over the baseline required (0: a tie passes; -0.02 allows trailing by 0.02).",
    )
    slice: str | None = Field(None, description="Judge the rule on this slice of the suite only (e.g. `feedback`).")
    exclude_slice: str | None = Field(
        None,
        description="Judge the rule on every case but this slice (e.g. `feedback`: no regression on the regular suite).",
    )

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> GateRule:
        given = [kind for kind in _RULE_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a gate rule needs exactly one of {', '.join(_RULE_KINDS)}; got {', '.join(given) or 'none'}"
            )
        if (
            self.significant
            and self.beat_champion_by is None
            and self.max_slice_drop is None
            and not self.beat_baseline
        ):
            raise FieldError(
                ("significant",), "significant only applies to beat_champion_by, max_slice_drop and beat_baseline"
            )
        if self.margin and self.beat_baseline is None:
            raise FieldError(("margin",), "margin only applies to beat_baseline")
        if self.slice is not None and self.exclude_slice is not None:
            raise FieldError(("exclude_slice",), "give slice or exclude_slice, not both")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in _RULE_KINDS if getattr(self, kind) is not None)

    @property
    def threshold(self) -> float:
        return self.margin if self.kind == "beat_baseline" else float(getattr(self, self.kind))

    def describe(self) -> str:
        """The rule as a reviewer reads it in a gate report."""
        text = {
            "at_least": f"{self.metric} ≥ {self.threshold:g}",
            "at_most": f"{self.metric} ≤ {self.threshold:g}",
            "beat_champion_by": f"{self.metric} beats champion by ≥ {self.threshold:g}"
            + (" (significant)" if self.significant else ""),
            "max_slice_drop": f"no slice of {self.metric} drops more than {self.threshold:g} below champion"
            + (" (significantly)" if self.significant else ""),
            "beat_baseline": f"{self.metric} beats {self.beat_baseline} only by ≥ {self.threshold:g}"
            + (" (significant)" if self.significant else ""),
        }[self.kind]
        if self.slice is not None:
            text += f" on slice {self.slice}"
        if self.exclude_slice is not None:
            text += f" excluding slice {self.exclude_slice}"
        return text


class Gates(Strict):
    """Promotion rules per artifact kind; all rules of a kind must pass."""

    index: list[GateRule] = Field([], description="Rules for a new index version (retrieval metrics).")
    embedder: list[GateRule] = Field(
        [],
        description="Rules for a fine-tuned embedding model, judged on the index it re-embedded (retrieval metrics).",
    )
    program: list[GateRule] = Field([], description="Rules for a newly optimized DSPy program (answer metrics).")
    adapter: list[GateRule] = Field([], description="Rules for a refreshed adapter (answer metrics).")
    feedback: list[GateRule] = Field(
        [], description="Rules for a DPO adapter learned from corrections (answer metrics)."
    )


def check_gate_metrics(gates: Gates, evaluation: EvaluationSettings) -> None:
    """Raise FieldError for a gate that reads a metric its stage's suite does not compute."""
    for kind in GATE_KINDS:
        retrieval = kind in RETRIEVAL_GATE_KINDS
        available = set(evaluation.retrieval_metrics if retrieval else evaluation.answer_metrics) | set(RUNTIME_METRICS)
        for position, rule in enumerate(getattr(gates, kind)):
            if rule.metric not in available:
                listed = "retrieval_metrics" if retrieval else "answer_metrics"
                raise FieldError(
                    ("gates", kind, position, "metric"),
                    f"gate metric {rule.metric!r} is not computed by the evaluation suite; "
                    f"add it to evaluation.{listed} or use one of {', '.join(sorted(available))}",
                )


def check_baseline_rules(gates: Gates, retrieves: bool) -> None:
    """Raise FieldError for a `beat_baseline` rule outside the program gates, or naming `retrieval` for a
    program that retrieves nothing (there is no first hit to answer with)."""
    for kind in GATE_KINDS:
        for position, rule in enumerate(getattr(gates, kind)):
            if rule.beat_baseline is None:
                continue
            if kind != "program":
                raise FieldError(
                    ("gates", kind, position, "beat_baseline"),
                    f"beat_baseline is judged on the program gates only (the prompt flow scores the baselines); "
                    f"move this rule to gates.program or use beat_champion_by in gates.{kind}",
                )
            if rule.beat_baseline == "retrieval" and not retrieves:
                raise FieldError(
                    ("gates", kind, position, "beat_baseline"),
                    "beat_baseline: retrieval needs a program that retrieves (program.retrieve_k > 0); "
                    "set retrieve_k or remove the rule",
                )
