"""`evaluate` module for Cadre's token_f1 metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/token_f1")   # or cadre.metrics.load_evaluate_metric("token_f1")
    metric.compute(predictions=[...], references=[...])  # -> {"token_f1": mean score}

The scores come from `cadre.metrics.token_f1`, so this module and Cadre's evaluation runner agree.
"""

import datasets
import evaluate

from cadre import metrics

_DESCRIPTION = """SQuAD-style F1 over bags of tokens after casefolding and removing punctuation and English articles; an empty prediction scores 0."""

_INPUTS = """
Args:
    predictions (list of str): one answer per example; None or empty scores 0.
    references (list of str, or list of lists of str): the reference, or the acceptable references, per example.
Returns:
    token_f1 (float): the mean of the per-example scores (0.0 for no examples).
"""


class TokenF1(evaluate.Metric):
    """SQuAD-style token F1."""

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
        scores = metrics.token_f1(predictions, references)
        return {"token_f1": sum(scores) / len(scores) if scores else 0.0}
