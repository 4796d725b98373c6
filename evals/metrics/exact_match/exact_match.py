"""`evaluate` module for Cadre's exact_match metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/exact_match")   # or cadre.metrics.load_evaluate_metric("exact_match")
    metric.compute(predictions=[...], references=[...])  # -> {"exact_match": mean score}

The scores come from `cadre.metrics.exact_match`, so this module and Cadre's evaluation runner agree.
"""

import datasets
import evaluate

from cadre import metrics

_DESCRIPTION = """Share of predictions equal to a reference after stripping, casefolding and collapsing whitespace; when the reference is an ICD-10 code the dot and surrounding punctuation are ignored (a0102 == A01.02)."""

_INPUTS = """
Args:
    predictions (list of str): one answer per example; None or empty scores 0.
    references (list of str, or list of lists of str): the reference, or the acceptable references, per example.
Returns:
    exact_match (float): the mean of the per-example scores (0.0 for no examples).
"""


class ExactMatch(evaluate.Metric):
    """Exact match after normalising case and whitespace (ICD codes: dot-insensitive)."""

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
        scores = metrics.exact_match(predictions, references)
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0}
