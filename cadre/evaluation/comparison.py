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
        costs: per system (`baseline`, `candidate`, `retrieval_only`, `retrieval_configured`, `declared`), LM usage and `wall_seconds`.
        declared: the declared (un-optimized) program, when `baseline` is a champion (else `baseline` is it).
        answer_mode: how the candidate answers (`free`, `constrained`, `score`; chosen on dev or declared).
        answers_are_ids: whether a right answer is a document id (`evaluation.retrieval_answer: id`), so that an
            answer outside the retrieved ids is an invented one; False where answers are texts (a pronunciation).
        retrieval_configured: the top-1 document of the index version the configured embedding model embedded,
            where a refreshed embedder's version is live (retrieval before the embedder refresh); else None.
    """

    __test__ = False  # not a pytest class

    baseline: EvaluationResult
    candidate: EvaluationResult
    retrieval_only: EvaluationResult | None
    baseline_is_champion: bool
    costs: dict[str, dict[str, float]]
    declared: EvaluationResult | None = None
    answer_mode: str = "free"
    answers_are_ids: bool = True
    retrieval_configured: EvaluationResult | None = None

    @property
    def baselines(self) -> dict[str, EvaluationResult]:
        """The reference systems a `beat_baseline` gate rule names: `retrieval` when the program retrieves."""
        return {"retrieval": self.retrieval_only} if self.retrieval_only is not None else {}


@dataclass(frozen=True)
class AdapterScores:
    """Candidate and champion adapter (or the bare base model) on the same test cases."""

    candidate: EvaluationRun
    champion: EvaluationRun
    champion_is_adapter: bool


def outside_candidates(result: EvaluationResult) -> float:
    """Share of answered cases whose answer is not among the ids retrieved for them (an invented answer)."""
    answered = [e for e in result.examples if e.output and e.retrieved_ids is not None]
    if not answered:
        return 0.0
    return sum(1 for e in answered if e.output.strip() not in e.retrieved_ids) / len(answered)
