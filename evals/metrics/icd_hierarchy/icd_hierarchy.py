"""`evaluate` module for Cadre's icd_hierarchy metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/icd_hierarchy")   # or cadre.evaluation.metrics.load_evaluate_metric("icd_hierarchy")
    metric.compute(predictions=[...], references=[...])  # -> {"icd_hierarchy": mean score}

The scores come from `cadre.evaluation.metrics.icd_hierarchy`, so this module and Cadre's evaluation runner agree.
"""

import cadre.evaluation.metric_modules as shared


class IcdHierarchy(shared.AnswerMetric):
    """Partial credit for ICD-10-CM codes near the reference code."""

    metric_name = "icd_hierarchy"
    description_text = """1.0 for the same ICD-10-CM code, 0.5 for the same 3-character category, 0.25 for a shared block, 0.1 for the same chapter, 0 otherwise (simple-icd-10-cm hierarchy)."""
