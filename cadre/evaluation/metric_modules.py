"""The shared body of the local `evaluate` modules in `evals/metrics/` (hub loading fails offline).

Each module there is a few lines: its docs and a subclass naming the metric. The scores come from
`cadre.evaluation.metrics`, so `evaluate.load(path).compute(...)` and Cadre's evaluation runner agree. A module
imports this one as a module (`import cadre.evaluation.metric_modules as shared`), never its classes by name:
`evaluate` takes the first `EvaluationModule` class it finds in the module's namespace as the metric.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from cadre.evaluation import metrics

ANSWER_INPUTS = """
Args:
    predictions (list of str): one answer per example; None or empty scores 0.
    references (list of str, or list of lists of str): the reference, or the acceptable references, per example.
Returns:
    {name} (float): the mean of the per-example scores (0.0 for no examples).
"""

RETRIEVAL_INPUTS = """
Args:
    predictions (list of lists of str): the retrieved ids per example, best first.
    references (list of lists of str): the relevant ids per example.
    k (int, default 10): the cut-off rank of recall, hit and nDCG.
Returns:
    recall@k, hit@k, mrr, ndcg@k (float): means of the per-example scores (0.0 for no examples).
"""


def mean(scores: list[float]) -> float:
    """Mean of per-example scores; 0.0 for no examples."""
    return sum(scores) / len(scores) if scores else 0.0


class AnswerMetric(evaluate.Metric):
    """An answer metric of `cadre.evaluation.metrics`: subclasses set `metric_name` and `description_text`."""

    metric_name = ""
    description_text = ""

    def _info(self) -> evaluate.MetricInfo:
        string = datasets.Value("string")
        return evaluate.MetricInfo(
            description=self.description_text,
            citation="",
            inputs_description=ANSWER_INPUTS.format(name=self.metric_name),
            features=[
                datasets.Features({"predictions": string, "references": string}),
                datasets.Features({"predictions": string, "references": datasets.Sequence(string)}),
            ],
        )

    def _compute(self, predictions: list[Any], references: list[Any]) -> dict[str, float]:
        return {self.metric_name: mean(metrics.compute(self.metric_name, predictions, references))}


class RetrievalMetrics(evaluate.Metric):
    """recall@k, hit@k, MRR and nDCG@k of `cadre.evaluation.metrics` over ranked id lists (binary relevance)."""

    description_text = ""

    def _info(self) -> evaluate.MetricInfo:
        ids = datasets.Sequence(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=self.description_text,
            citation="",
            inputs_description=RETRIEVAL_INPUTS,
            features=datasets.Features({"predictions": ids, "references": ids}),
        )

    def _compute(self, predictions: list[Any], references: list[Any], k: int = 10) -> dict[str, float]:
        names = (f"recall@{k}", f"hit@{k}", "mrr", f"ndcg@{k}")
        return {name: mean(metrics.compute(name, predictions, references)) for name in names}
