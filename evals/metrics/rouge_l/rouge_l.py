"""`evaluate` module for Cadre's rouge_l metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/rouge_l")   # or cadre.metrics.load_evaluate_metric("rouge_l")
    metric.compute(predictions=[...], references=[...])  # -> {"rouge_l": mean score}

The scores come from `cadre.metrics.rouge_l`, so this module and Cadre's evaluation runner agree.
"""

import datasets
import evaluate

from cadre import metrics

_DESCRIPTION = """F-measure of the longest common subsequence of casefolded word tokens between prediction and reference."""

_INPUTS = """
Args:
    predictions (list of str): one answer per example; None or empty scores 0.
    references (list of str, or list of lists of str): the reference, or the acceptable references, per example.
Returns:
    rouge_l (float): the mean of the per-example scores (0.0 for no examples).
"""


class RougeL(evaluate.Metric):
    """ROUGE-L F-measure over word tokens."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
            ],
        )

    def _compute(self, predictions, references):
        scores = metrics.rouge_l(predictions, references)
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
