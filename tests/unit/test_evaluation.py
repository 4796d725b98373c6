"""The evaluation runner: loading cases, scoring, slices, intervals, failures per case, comparison."""

from __future__ import annotations

import json
import logging
import re

import pytest

from cadre.config.evaluation import RUNTIME_METRICS
from cadre.evaluation.results import (
    EvaluationResult,
    Prediction,
    compare,
    evaluate_cases,
    load_cases,
    paired_bootstrap_interval,
    read_split,
    score_predictions,
)

CASES = [
    {"id": "c1", "phrase": "typhoid endocarditis", "code": "A01.02", "relevant_ids": ["A01.02"], "slice": "A00-B99"},
    {"id": "c2", "phrase": "classical cholera", "code": "A00.0", "relevant_ids": ["A00.0"], "slice": "A00-B99"},
    {"id": "c3", "phrase": "lip cancer", "code": "C00.0", "relevant_ids": ["C00.0"], "slice": "C00-D49"},
    {"id": "c4", "phrase": "salmonellosis", "code": "A02.0", "relevant_ids": ["A02.0"], "slice": "A00-B99"},
]
ANSWERS = {"c1": "A01.02", "c2": "A00.1", "c3": "C00.0", "c4": "A02.0"}  # c2 wrong, same category


def oracle(case):
    return Prediction(
        output=ANSWERS[case["id"]], retrieved_ids=["X", case["code"]], lm_calls=2, tokens=40, cost_usd=0.001
    )


# --- loading -------------------------------------------------------------------------------------


def write_split(tmp_path, lines):
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_malformed_lines_are_skipped_and_counted(tmp_path, caplog):
    suite = write_split(
        tmp_path,
        [
            json.dumps(CASES[0]),
            "{not json",
            "[1, 2]",
            json.dumps({"id": "", "phrase": "empty id"}),
            json.dumps(CASES[0]),  # duplicate id
            json.dumps({"id": "x", "relevant_ids": "A01.02"}),
            "",
            json.dumps(CASES[1]),
        ],
    )
    read = read_split(suite, "test")
    assert [case["id"] for case in read.cases] == ["c1", "c2"]
    assert [(s.line, s.reason.split(":")[0]) for s in read.skipped] == [
        (2, "invalid JSON"),
        (3, "expected a JSON object, got list"),
        (4, "field 'id' must be a non-empty string or an integer (or be left out"),
        (5, "duplicate id 'c1'"),
        (6, "field 'relevant_ids' must be a list of strings"),
    ]
    with caplog.at_level(logging.WARNING, logger="cadre.evaluation"):
        assert [case["id"] for case in load_cases(suite, "test")] == ["c1", "c2"]
    assert "skipped 5 malformed line(s)" in caplog.text


def test_a_case_without_id_gets_a_stable_content_hash_and_integer_ids_become_text(tmp_path):
    suite = write_split(
        tmp_path,
        [
            json.dumps({"phrase": "no id", "code": "A01.02"}),
            json.dumps({"id": 7, "phrase": "p", "code": "B"}),
            json.dumps({"code": "A01.02", "phrase": "no id"}),
        ],
    )  # same content, other key order
    read = read_split(suite, "test")
    first = read.cases[0]["id"]
    assert first.startswith("h") and len(first) == 17 and read_split(suite, "test").cases[0]["id"] == first
    assert read.cases[1]["id"] == "7"
    assert [(s.line, s.reason) for s in read.skipped] == [(3, f"duplicate id {first!r}")]


def test_limit_counts_valid_cases(tmp_path):
    suite = write_split(tmp_path, ["oops", *(json.dumps(case) for case in CASES)])
    assert [case["id"] for case in load_cases(suite, "test", limit=2)] == ["c1", "c2"]


# --- scoring -------------------------------------------------------------------------------------


def run(cases=CASES, predict=oracle, metrics=("exact_match", "icd_hierarchy", "recall@1", "mrr"), **options):
    return evaluate_cases(
        cases, predict, list(metrics), name="candidate", output_field="code", retrieval_field="relevant_ids", **options
    )


def test_aggregates_are_means_of_per_example_scores():
    result = run()
    assert result.cases == 4 and result.errors == 0
    assert result.scores["exact_match"] == pytest.approx(0.75)
    assert result.scores["icd_hierarchy"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert result.scores["recall@1"] == 0.0
    assert result.scores["mrr"] == pytest.approx(0.5)
    assert result.values("exact_match") == {"c1": 1.0, "c2": 0.0, "c3": 1.0, "c4": 1.0}


def test_slices_aggregate_their_own_cases():
    result = run()
    assert set(result.slices) == {"A00-B99", "C00-D49"}
    assert result.slices["A00-B99"].cases == 3
    assert result.slices["A00-B99"].scores["exact_match"] == pytest.approx(2 / 3)
    assert result.slices["C00-D49"].scores["exact_match"] == 1.0


def test_runtime_metrics_carry_the_schema_names():
    result = run()
    assert set(RUNTIME_METRICS) <= set(result.scores)
    assert result.scores["lm_calls"] == 2.0
    assert result.scores["tokens_per_case"] == 40.0
    assert result.scores["cost_usd"] == pytest.approx(0.001)
    assert result.scores["latency_p95_ms"] >= result.scores["latency_p50_ms"] > 0.0


def test_latency_percentiles_use_the_given_latencies():
    cases = [{"id": f"c{i}", "code": "A00.0"} for i in range(10)]
    outputs = [Prediction(output="A00.0", latency_ms=10.0 * (i + 1)) for i in range(10)]
    result = score_predictions(cases, outputs, ["exact_match"], name="timed", output_field="code")
    assert result.scores["latency_p50_ms"] == pytest.approx(55.0)
    assert result.scores["latency_p95_ms"] == pytest.approx(95.5)


def test_a_failing_case_counts_as_wrong_and_keeps_its_error():
    def flaky(case):
        if case["id"] == "c3":
            raise RuntimeError("model server went away")
        return oracle(case)

    result = run(predict=flaky)
    failed = next(e for e in result.examples if e.case_id == "c3")
    assert result.errors == 1
    assert failed.error == "RuntimeError: model server went away"
    assert failed.scores == {"exact_match": 0.0, "icd_hierarchy": 0.0, "recall@1": 0.0, "mrr": 0.0}
    assert result.scores["exact_match"] == pytest.approx(0.5)
    assert result.cases == 4


def test_a_prediction_carrying_an_error_scores_zero_even_with_an_output():
    result = score_predictions(
        CASES[:1], [Prediction(output="A01.02", error="unparsable")], ["exact_match"], name="x", output_field="code"
    )
    assert result.scores["exact_match"] == 0.0 and result.errors == 1


def test_metrics_are_checked_before_any_prediction_runs():
    calls = []
    with pytest.raises(ValueError, match="needs retrieval_field"):
        evaluate_cases(CASES, lambda case: calls.append(case), ["mrr"], name="x", output_field="code")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        evaluate_cases(CASES, lambda case: calls.append(case), ["bleu"], name="x", output_field="code")
    assert calls == []


def test_no_cases_and_duplicate_ids_are_errors():
    with pytest.raises(ValueError, match="no cases"):
        score_predictions([], [], ["exact_match"], name="x", output_field="code")
    with pytest.raises(ValueError, match="not unique"):
        score_predictions([CASES[0], CASES[0]], ["A01.02", "A01.02"], ["exact_match"], name="x", output_field="code")


def test_bootstrap_intervals_are_seeded_and_bracket_the_mean():
    cases = [{"id": f"c{i}", "code": "A00.0", "slice": "s"} for i in range(200)]
    outputs = ["A00.0" if i % 3 else "B99" for i in range(200)]
    first = score_predictions(cases, outputs, ["exact_match"], name="x", output_field="code", seed=7)
    again = score_predictions(cases, outputs, ["exact_match"], name="x", output_field="code", seed=7)
    other = score_predictions(cases, outputs, ["exact_match"], name="x", output_field="code", seed=8)
    low, high = first.intervals["exact_match"]
    assert low < first.scores["exact_match"] < high
    assert 0.05 < high - low < 0.2  # about ±1.96·sqrt(p(1-p)/n) = ±0.065
    assert again.intervals == first.intervals
    assert other.intervals != first.intervals
    narrow = score_predictions(cases, outputs, ["exact_match"], name="x", output_field="code", confidence=0.5)
    assert narrow.intervals["exact_match"][1] - narrow.intervals["exact_match"][0] < high - low


def test_result_round_trips_through_json_and_gives_table_rows():
    result = run()
    restored = EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    rows = result.rows()
    assert len(rows) == 4
    assert rows[1]["case_id"] == "c2" and rows[1]["output"] == "A00.1" and rows[1]["exact_match"] == 0.0
    assert rows[1]["retrieved_ids"] == "X A00.0"
    assert all(not isinstance(value, list | dict) for row in rows for value in row.values())
    assert result.columns()["case_id"] == ["c1", "c2", "c3", "c4"]


def test_mlflow_metric_names_are_valid_there():
    logged = run().mlflow_metrics(prefix="test/")
    assert logged["test/recall_at_1"] == 0.0 and "test/recall_at_1_ci_low" in logged
    assert all(re.fullmatch(r"[/\w.\- :]*", name) for name in logged)  # mlflow's own rule for names


# --- comparison ----------------------------------------------------------------------------------


def graded(name, correct, ids=None, slices=None):
    ids = ids or [f"c{i}" for i in range(len(correct))]
    cases = [
        {"id": case_id, "code": "A00.0", "slice": (slices or ["s"] * len(ids))[i]} for i, case_id in enumerate(ids)
    ]
    outputs = ["A00.0" if hit else "Z99.89" for hit in correct]
    return score_predictions(cases, outputs, ["exact_match"], name=name, output_field="code")


def test_compare_pairs_on_shared_cases_only():
    candidate = graded("new", [1, 1, 1, 0], ids=["a", "b", "c", "d"])
    champion = graded("old", [0, 1, 0, 0, 1], ids=["a", "b", "c", "d", "e"])
    versus = compare(candidate, champion)
    assert (versus.shared_cases, versus.candidate_only, versus.champion_only) == (4, 0, 1)
    exact = versus.metrics["exact_match"]
    assert (exact.candidate, exact.champion, exact.delta) == (0.75, 0.25, 0.5)
    assert exact.interval[0] <= 0.5 <= exact.interval[1]


def test_identical_results_differ_by_exactly_zero():
    result = graded("same", [1, 0, 1, 1, 0, 1])
    exact = compare(result, result).metrics["exact_match"]
    assert exact.delta == 0.0 and exact.interval == (0.0, 0.0)


def test_pairing_removes_case_difficulty_from_the_interval():
    # Half the cases are hard for both versions; the candidate fixes 10 of the easy ones.
    champion_hits = [1] * 50 + [0] * 50
    candidate_hits = [1] * 50 + [1] * 10 + [0] * 40
    paired = compare(graded("new", candidate_hits), graded("old", champion_hits)).metrics["exact_match"]
    unpaired = compare(
        graded("new", candidate_hits, ids=[f"n{i}" for i in range(100)]), graded("old", champion_hits)
    ).metrics["exact_match"]
    assert paired.cases == 100 and unpaired.cases == 0
    assert paired.delta == pytest.approx(0.1) and unpaired.delta == pytest.approx(0.1)
    assert paired.interval[0] > 0.0  # paired: the gain is clearly positive
    assert unpaired.interval[0] < 0.0  # unpaired: lost in the noise
    assert paired.interval[1] - paired.interval[0] < unpaired.interval[1] - unpaired.interval[0]


def test_compare_reports_per_slice_differences():
    slices = ["x", "x", "y", "y"]
    versus = compare(graded("new", [1, 1, 0, 0], slices=slices), graded("old", [1, 0, 1, 1], slices=slices))
    by_slice = {row.slice: row for row in versus.slices if row.metric == "exact_match"}
    assert by_slice["x"].delta == 0.5 and by_slice["x"].drop == -0.5
    assert by_slice["y"].delta == -1.0 and by_slice["y"].drop == 1.0


def test_lower_is_better_metrics_gain_when_they_fall():
    cases = [{"id": f"c{i}", "code": "A00.0"} for i in range(20)]
    fast = score_predictions(
        cases, [Prediction("A00.0", latency_ms=10.0) for _ in cases], ["exact_match"], name="fast", output_field="code"
    )
    slow = score_predictions(
        cases, [Prediction("A00.0", latency_ms=30.0) for _ in cases], ["exact_match"], name="slow", output_field="code"
    )
    latency = compare(fast, slow).metrics["latency_p95_ms"]
    assert latency.delta == pytest.approx(-20.0) and latency.gain == pytest.approx(20.0)
    assert latency.gain_interval == pytest.approx((20.0, 20.0))


def test_compare_rejects_a_metric_missing_on_one_side():
    with pytest.raises(ValueError, match="not computed for both"):
        compare(graded("new", [1]), graded("old", [1]), ["token_f1"])


def test_paired_interval_needs_aligned_values():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_interval("exact_match", [1.0, 0.0], [1.0])


def test_a_case_without_a_program_field_is_skipped_and_counted(tmp_path):
    (tmp_path / "test.jsonl").write_text(
        '{"id": "a", "question": "q1", "module": "json"}\n'
        '{"id": "b", "question": "q2"}\n'
        '{"id": "c", "question": "", "module": "os"}\n'
    )
    read = read_split(tmp_path, "test", required=["question", "module"])
    assert [case["id"] for case in read.cases] == ["a"]
    assert [(s.line, s.reason.split(" (")[0]) for s in read.skipped] == [
        (2, "missing 'module'"),
        (3, "missing 'question'"),
    ]
    assert len(read_split(tmp_path, "test").cases) == 3, "without required fields only the shape is checked"
