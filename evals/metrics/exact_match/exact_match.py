"""`evaluate` module for Cadre's exact_match metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/exact_match")   # or cadre.evaluation.metrics.load_evaluate_metric("exact_match")
    metric.compute(predictions=[...], references=[...])  # -> {"exact_match": mean score}

The scores come from `cadre.evaluation.metrics.exact_match`, so this module and Cadre's evaluation runner agree.
"""

import cadre.evaluation.metric_modules as shared


class ExactMatch(shared.AnswerMetric):
    """Exact match after normalising case and whitespace (ICD codes: dot-insensitive)."""

    metric_name = "exact_match"
    description_text = """Share of predictions equal to a reference after stripping, casefolding and collapsing whitespace; when the reference is an ICD-10 code the dot and surrounding punctuation are ignored (a0102 == A01.02)."""
