"""Metrics on hand-checked cases, and the local `evaluate` modules agreeing with them."""

from __future__ import annotations

import math

import pytest

from cadre.config.evaluation import ANSWER_METRICS
from cadre.evaluation import metrics


def test_exact_match_normalises_case_whitespace_and_icd_dots():
    predictions = ["A0102", " a01.02 ", "A01.02.", "Typhoid   Fever", "STRASSE", "x", "A01.03"]
    references = ["A01.02", "A01.02", "A01.02", "typhoid fever", "Straße", ["y", "X"], "A01.02"]
    assert metrics.exact_match(predictions, references) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_exact_match_keeps_dots_that_are_not_in_codes():
    assert metrics.exact_match(["eg", "e.g."], ["e.g.", "e.g."]) == [0.0, 1.0]


@pytest.mark.parametrize("name", [*ANSWER_METRICS])
def test_answer_metrics_score_missing_and_empty_predictions_zero(name):
    scores = metrics.compute(name, [None, "", "   ", "A01.02"], ["A01.02", "A01.02", "", None])
    assert scores == [0.0, 0.0, 0.0, 0.0]


def test_token_f1_is_squad_style():
    scores = metrics.token_f1(["the cat sat", "Ménière disease!", "dog"], ["a cat sat down", "ménière DISEASE", "cat"])
    assert scores[0] == pytest.approx(0.8)  # precision 2/2, recall 2/3
    assert scores[1] == 1.0
    assert scores[2] == 0.0


def test_token_f1_takes_the_best_of_several_references():
    assert metrics.token_f1(["cat sat"], [["dog", "cat sat"]]) == [1.0]


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    scores = metrics.rouge_l(
        ["typhoid fever with heart involvement", "b a", "Ünïcode wörds"],
        ["typhoid heart involvement", "a b", "ünïcode WÖRDS"],
    )
    assert scores[0] == pytest.approx(0.75)  # LCS 3: precision 3/5, recall 3/3
    assert scores[1] == pytest.approx(0.5)
    assert scores[2] == 1.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A01.02", 1.0),
        ("a0102", 1.0),
        ("A01.03", 0.5),  # same category A01
        ("A01.99", 0.5),  # not a real code, but a real category
        ("A02.0", 0.25),  # same block A00-A09
        ("B01.9", 0.1),  # same chapter A00-B99
        ("C00.0", 0.0),
        ("typhoid", 0.0),
        ("Q", 0.0),
    ],
)
def test_icd_hierarchy_gives_graded_credit(prediction, expected):
    assert metrics.icd_hierarchy([prediction], ["A01.02"]) == [expected]


def test_icd_hierarchy_against_an_unknown_reference_only_credits_the_exact_code():
    assert metrics.icd_hierarchy(["ZZ9.1", "ZZ9.2"], ["ZZ9.1", "ZZ9.1"]) == [1.0, 0.0]


RANKED = [["d1", "d2", "d3", "d4"], ["d2", "d2", "d4"], None, ["d1"]]
RELEVANT = [["d2", "d4"], ["d2", "d4"], ["d1"], []]


def test_recall_and_hit_at_k():
    assert metrics.recall_at_k(RANKED, RELEVANT, 1) == [0.0, 0.5, 0.0, 0.0]
    assert metrics.recall_at_k(RANKED, RELEVANT, 2) == [0.5, 1.0, 0.0, 0.0]  # a repeated id counts once
    assert metrics.recall_at_k(RANKED, RELEVANT, 4) == [1.0, 1.0, 0.0, 0.0]
    assert metrics.hit_at_k(RANKED, RELEVANT, 1) == [0.0, 1.0, 0.0, 0.0]
    assert metrics.hit_at_k(RANKED, RELEVANT, 2) == [1.0, 1.0, 0.0, 0.0]


def test_mrr_uses_the_first_relevant_rank():
    assert metrics.mrr(RANKED, RELEVANT) == [0.5, 1.0, 0.0, 0.0]


def test_ndcg_with_binary_relevance():
    ideal = 1 + 1 / math.log2(3)
    expected_first = (1 / math.log2(3) + 1 / math.log2(5)) / ideal
    scores = metrics.ndcg_at_k(RANKED, RELEVANT, 4)
    assert scores[0] == pytest.approx(expected_first)
    assert scores[1] == pytest.approx(1.0)  # d2, d4 at ranks 1 and 2 after dropping the repeat
    assert scores[2:] == [0.0, 0.0]
    assert metrics.ndcg_at_k([["x", "a"]], [["a"]], 1) == [0.0]


def test_compute_dispatches_schema_names():
    assert metrics.compute("recall@2", RANKED, RELEVANT) == metrics.recall_at_k(RANKED, RELEVANT, 2)
    assert metrics.compute("ndcg@10", RANKED, RELEVANT) == metrics.ndcg_at_k(RANKED, RELEVANT, 10)
    assert metrics.compute("hit@1", RANKED, RELEVANT) == metrics.hit_at_k(RANKED, RELEVANT, 1)
    assert metrics.compute("mrr", RANKED, RELEVANT) == metrics.mrr(RANKED, RELEVANT)
    for name in ANSWER_METRICS:
        assert metrics.compute(name, ["A01.02"], ["A01.02"]) == [1.0]


@pytest.mark.parametrize("name", ["bleu", "recall@0", "recall@", "Exact_Match"])
def test_compute_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(name, ["a"], ["a"])


def test_batches_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.exact_match(["a", "b"], ["a"])


def test_metric_kinds():
    assert metrics.is_retrieval_metric("recall@10") and metrics.is_retrieval_metric("mrr")
    assert not metrics.is_retrieval_metric("exact_match")
    assert not metrics.is_known_metric("latency_p95_ms")


# --- the local evaluate modules ----------------------------------------------------------------

ANSWERS = ["A0102", "a01.03", None, "the typhoid fever", "Ménière disease", "B01.9"]
REFERENCES = ["A01.02", "A01.02", "A01.02", "typhoid fever with heart involvement", "ménière DISEASE", "A01.02"]


@pytest.fixture(scope="module")
def evaluate_modules():
    return {name: metrics.load_evaluate_metric(name) for name in metrics.EVALUATE_MODULES}


@pytest.mark.parametrize("name", ["exact_match", "token_f1", "rouge_l", "icd_hierarchy"])
def test_evaluate_module_matches_cadre_metrics(evaluate_modules, name):
    scores = metrics.compute(name, ANSWERS, REFERENCES)
    result = evaluate_modules[name].compute(predictions=ANSWERS, references=REFERENCES)
    assert result == {name: pytest.approx(sum(scores) / len(scores))}
    assert 0.0 < result[name] < 1.0  # the cases mix hits and misses, so a constant would fail


def test_evaluate_module_accepts_several_references_per_example(evaluate_modules):
    result = evaluate_modules["exact_match"].compute(predictions=["a0102", "x"], references=[["B20", "A01.02"], ["y"]])
    assert result == {"exact_match": 0.5}


def test_evaluate_retrieval_module_matches_cadre_metrics(evaluate_modules):
    ranked = [["d1", "d2", "d3", "d4"], ["d2", "d4"], [], ["d1"]]
    relevant = [["d2", "d4"], ["d4"], ["d1"], ["d9"]]
    result = evaluate_modules["retrieval"].compute(predictions=ranked, references=relevant, k=2)
    for name in ("recall@2", "hit@2", "mrr", "ndcg@2"):
        scores = metrics.compute(name, ranked, relevant)
        assert result[name] == pytest.approx(sum(scores) / len(scores))
    assert result["recall@2"] == pytest.approx((0.5 + 1.0 + 0 + 0) / 4)


def test_unknown_evaluate_module_is_an_error():
    with pytest.raises(ValueError, match="no local evaluate module"):
        metrics.evaluate_module_path("bleu")
