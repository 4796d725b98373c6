"""`evaluate` module for Cadre's retrieval metrics, loaded by path (hub loading fails offline).

    metric = evaluate.load("evals/metrics/retrieval")   # or cadre.metrics.load_evaluate_metric("retrieval")
    metric.compute(predictions=[["A01.02", "A01.03"]], references=[["A01.02"]], k=10)
    # -> {"recall@10": …, "hit@10": …, "mrr": …, "ndcg@10": …}

The scores come from `cadre.metrics` (binary relevance), so this module and Cadre's evaluation
runner agree.
"""

import datasets
import evaluate

from cadre import metrics

_DESCRIPTION = """Retrieval quality of ranked document ids against the set of relevant ids: recall@k, hit@k, mean reciprocal rank and nDCG@k (binary relevance)."""

_INPUTS = """
Args:
    predictions (list of lists of str): the retrieved ids per example, best first.
    references (list of lists of str): the relevant ids per example.
    k (int, default 10): the cut-off rank of recall, hit and nDCG.
Returns:
    recall@k, hit@k, mrr, ndcg@k (float): means of the per-example scores (0.0 for no examples).
"""


class Retrieval(evaluate.Metric):
    """recall@k, hit@k, MRR and nDCG@k over ranked id lists."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, k=10):
        names = (f"recall@{k}", f"hit@{k}", "mrr", f"ndcg@{k}")
        return {name: _mean(metrics.compute(name, predictions, references)) for name in names}


def _mean(scores):
    return sum(scores) / len(scores) if scores else 0.0
