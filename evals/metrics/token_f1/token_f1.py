"""`evaluate` module for Cadre's token_f1 metric, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/token_f1")   # or cadre.evaluation.metrics.load_evaluate_metric("token_f1")
    metric.compute(predictions=[...], references=[...])  # -> {"token_f1": mean score}

The scores come from `cadre.evaluation.metrics.token_f1`, so this module and Cadre's evaluation runner agree.
"""

import cadre.evaluation.metric_modules as shared


class TokenF1(shared.AnswerMetric):
    """SQuAD-style token F1."""

    metric_name = "token_f1"
    description_text = """SQuAD-style F1 over bags of tokens after casefolding and removing punctuation and English articles; an empty prediction scores 0."""
