"""`evaluate` module for Cadre's retrieval metrics, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/retrieval")   # or cadre.evaluation.metrics.load_evaluate_metric("retrieval")
    metric.compute(predictions=[["A01.02", "A01.03"]], references=[["A01.02"]], k=10)
    # -> {"recall@10": …, "hit@10": …, "mrr": …, "ndcg@10": …}

The scores come from `cadre.evaluation.metrics` (binary relevance), so this module and Cadre's evaluation
runner agree.
"""

import cadre.evaluation.metric_modules as shared


class Retrieval(shared.RetrievalMetrics):
    """recall@k, hit@k, MRR and nDCG@k over ranked id lists."""

    description_text = """Retrieval quality of ranked document ids against the set of relevant ids: recall@k, hit@k, mean reciprocal rank and nDCG@k (binary relevance)."""
