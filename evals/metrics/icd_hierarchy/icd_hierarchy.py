"""`evaluate` module for Cadre's icd_hierarchy metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/icd_hierarchy")   # or cadre.metrics.load_evaluate_metric("icd_hierarchy")
    metric.compute(predictions=[...], references=[...])  # -> {"icd_hierarchy": mean score}

The scores come from `cadre.metrics.icd_hierarchy`, so this module and Cadre's evaluation runner agree.
"""

import datasets
import evaluate

from cadre import metrics

_DESCRIPTION = """1.0 for the same ICD-10-CM code, 0.5 for the same 3-character category, 0.25 for a shared block, 0.1 for the same chapter, 0 otherwise (simple-icd-10-cm hierarchy)."""

_INPUTS = """
Args:
    predictions (list of str): one answer per example; None or empty scores 0.
    references (list of str, or list of lists of str): the reference, or the acceptable references, per example.
Returns:
    icd_hierarchy (float): the mean of the per-example scores (0.0 for no examples).
"""


class IcdHierarchy(evaluate.Metric):
    """Partial credit for ICD-10-CM codes near the reference code."""

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
        scores = metrics.icd_hierarchy(predictions, references)
        return {"icd_hierarchy": sum(scores) / len(scores) if scores else 0.0}
