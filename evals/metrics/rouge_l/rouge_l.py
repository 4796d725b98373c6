"""`evaluate` module for Cadre's rouge_l metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/rouge_l")   # or cadre.evaluation.metrics.load_evaluate_metric("rouge_l")
    metric.compute(predictions=[...], references=[...])  # -> {"rouge_l": mean score}

The scores come from `cadre.evaluation.metrics.rouge_l`, so this module and Cadre's evaluation runner agree.
"""

import cadre.evaluation.metric_modules as shared


class RougeL(shared.AnswerMetric):
    """ROUGE-L F-measure over word tokens."""

    metric_name = "rouge_l"
    description_text = (
        """F-measure of the longest common subsequence of casefolded word tokens between prediction and reference."""
    )
