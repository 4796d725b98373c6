"""Gate decisions: every rule kind passing and failing, skipping without a champion, the report."""

from __future__ import annotations

import json

import pytest

from cadre.config.evaluation import GateRule
from cadre.evaluation.gates import GateDecision, decide
from cadre.evaluation.results import EvaluationResult, Prediction, score_predictions


def result(name, hits, *, slices=None, latency_ms=100.0, ids=None, metrics=("exact_match", "icd_hierarchy")):
    """A scored result whose exact_match per case follows `hits` (1 right, 0 wrong)."""
    ids = ids or [f"c{i}" for i in range(len(hits))]
    slices = slices or ["A00-B99"] * len(hits)
    cases = [{"id": case_id, "code": "A01.02", "slice": slices[i]} for i, case_id in enumerate(ids)]
    outputs = [Prediction("A01.02" if hit else "A01.03", latency_ms=latency_ms, lm_calls=1) for hit in hits]
    return score_predictions(cases, outputs, list(metrics), name=name, output_field="code")


def rule(**fields):
    return GateRule.model_validate(fields)


def test_at_least_and_at_most():
    candidate = result("v2", [1, 1, 1, 0], latency_ms=400.0)  # exact_match 0.75
    outcome = decide("program", [rule(metric="exact_match", at_least=0.7)], candidate, None).outcomes[0]
    assert outcome.passed is True and outcome.candidate == 0.75
    assert decide("program", [rule(metric="exact_match", at_least=0.8)], candidate, None).passed is False
    assert decide("program", [rule(metric="latency_p95_ms", at_most=500)], candidate, None).passed is True
    failed = decide("program", [rule(metric="latency_p95_ms", at_most=300)], candidate, None)
    assert failed.passed is False
    assert "400 > 300" in failed.outcomes[0].detail


def test_at_least_on_the_threshold_passes():
    assert decide("program", [rule(metric="exact_match", at_least=0.75)], result("v2", [1, 1, 1, 0]), None).passed


def test_beat_champion_by_compares_the_gain():
    champion = result("v1", [1, 0, 0, 0])
    candidate = result("v2", [1, 1, 0, 0])
    passed = decide("adapter", [rule(metric="exact_match", beat_champion_by=0.2)], candidate, champion)
    assert passed.passed is True
    outcome = passed.outcomes[0]
    assert (outcome.candidate, outcome.champion, outcome.delta) == (0.5, 0.25, 0.25)
    assert decide("adapter", [rule(metric="exact_match", beat_champion_by=0.3)], candidate, champion).passed is False


def test_a_tolerated_regression_passes_and_a_larger_one_fails():
    champion = result("v1", [1] * 100)
    slightly_worse = result("v2", [1] * 99 + [0])
    tolerate = [rule(metric="exact_match", beat_champion_by=-0.02)]
    assert decide("feedback", tolerate, slightly_worse, champion).passed is True
    assert decide("feedback", tolerate, result("v3", [1] * 95 + [0] * 5), champion).passed is False


def test_significance_needs_the_interval_above_the_threshold():
    champion = result("v1", [1] * 40 + [0] * 60)
    small_gain = result("v2", [1] * 40 + [1] * 3 + [0] * 57)  # +0.03 on 3 cases of 100
    plain = decide("adapter", [rule(metric="exact_match", beat_champion_by=0.01)], small_gain, champion)
    strict = decide(
        "adapter", [rule(metric="exact_match", beat_champion_by=0.01, significant=True)], small_gain, champion
    )
    assert plain.passed is True
    assert strict.passed is False
    assert strict.outcomes[0].interval[0] <= 0.01
    big_gain = result("v3", [1] * 40 + [1] * 30 + [0] * 30)
    assert (
        decide(
            "adapter", [rule(metric="exact_match", beat_champion_by=0.01, significant=True)], big_gain, champion
        ).passed
        is True
    )


def test_beating_on_latency_means_being_faster():
    champion = result("v1", [1] * 20, latency_ms=300.0)
    faster = result("v2", [1] * 20, latency_ms=200.0)
    rules = [rule(metric="latency_p95_ms", beat_champion_by=50)]
    assert decide("program", rules, faster, champion).passed is True
    assert decide("program", rules, champion, faster).passed is False


def test_max_slice_drop_fails_on_the_worst_slice():
    slices = ["A00-B99"] * 20 + ["C00-D49"] * 20
    champion = result("v1", [1] * 20 + [1] * 20, slices=slices)
    candidate = result("v2", [1] * 20 + [1] * 10 + [0] * 10, slices=slices)  # C00-D49 drops 0.5
    failed = decide("adapter", [rule(metric="exact_match", max_slice_drop=0.15)], candidate, champion)
    assert failed.passed is False
    outcome = failed.outcomes[0]
    assert (outcome.candidate, outcome.champion, outcome.delta) == (0.5, 1.0, -0.5)
    assert "C00-D49" in outcome.detail
    assert decide("adapter", [rule(metric="exact_match", max_slice_drop=0.6)], candidate, champion).passed is True


def test_a_significant_slice_rule_tells_a_real_drop_from_noise():
    """15 slices of 18 cases: a slice where 4 answers flip to wrong and none to right is noise at that size
    once 15 slices are compared; a slice where 9 of 18 flip is not."""
    names = [f"S{i:02d}" for i in range(15)]
    slices = [name for name in names for _ in range(18)]
    champion_hits = [1 if i % 18 < 8 else 0 for i in range(len(slices))]
    noisy = list(champion_hits)
    for i in range(4):
        noisy[i] = 0  # S00: 8 → 4 right of 18 (drop 0.222), every other slice unchanged
    strict, lenient = (
        rule(metric="exact_match", max_slice_drop=0.15),
        rule(metric="exact_match", max_slice_drop=0.15, significant=True),
    )
    champion, candidate = result("v1", champion_hits, slices=slices), result("v2", noisy, slices=slices)
    assert decide("program", [strict], candidate, champion).passed is False
    judged = decide("program", [lenient], candidate, champion).outcomes[0]
    assert judged.passed is True and judged.rule_text.endswith("(significantly)")
    assert (
        "S00 (18 cases): 0.444 → 0.222" in judged.detail
        and "not a significant drop" in judged.detail
        and "15 slices" in judged.detail
    )

    real = list(champion_hits)
    for i in range(8):
        real[i] = 0  # S00: 8 → 0 right
    failed = decide("program", [lenient], result("v3", real, slices=slices), champion).outcomes[0]
    assert failed.passed is False and "a real drop" in failed.detail
    _low, high = failed.interval
    assert high < 0 and failed.delta == pytest.approx(-8 / 18)
    with pytest.raises(ValueError, match="significant only applies"):
        rule(metric="exact_match", at_least=0.2, significant=True)


def test_slices_too_small_to_judge_are_reported_not_judged():
    slices = ["A00-B99"] * 20 + ["U00-U85"] * 2
    champion = result("v1", [1] * 22, slices=slices)
    candidate = result("v2", [1] * 20 + [0] * 2, slices=slices)
    decision = decide(
        "adapter", [rule(metric="exact_match", max_slice_drop=0.15)], candidate, champion, min_slice_cases=10
    )
    assert decision.passed is True
    assert "1 slice(s) under 10 cases not judged" in decision.outcomes[0].detail
    assert (
        decide(
            "adapter", [rule(metric="exact_match", max_slice_drop=0.15)], candidate, champion, min_slice_cases=2
        ).passed
        is False
    )


def test_without_a_champion_relative_rules_are_skipped_and_absolute_rules_decide():
    rules = [
        rule(metric="exact_match", at_least=0.5),
        rule(metric="exact_match", beat_champion_by=0.0),
        rule(metric="exact_match", max_slice_drop=0.1),
    ]
    decision = decide("program", rules, result("v1", [1, 1, 0, 0]), None)
    assert decision.passed is True
    assert [(o.passed, o.skipped) for o in decision.outcomes] == [(True, False), (None, True), (None, True)]
    assert "2 skipped (no champion yet)" in decision.summary
    assert decide("program", rules, result("v1", [1, 0, 0, 0]), None).passed is False


def test_only_relative_rules_and_no_champion_passes_and_says_nothing_was_checked():
    decision = decide("adapter", [rule(metric="exact_match", beat_champion_by=0.01)], result("v1", [0, 0]), None)
    assert decision.passed is True
    assert "nothing was checked" in decision.summary


def test_zero_rules_pass_and_say_so():
    decision = decide("index", [], result("v1", [0]), None)
    assert decision.passed is True and decision.outcomes == []
    assert "no index gate rules" in decision.summary
    assert "No rules are configured" in decision.to_markdown()


def test_a_metric_the_candidate_lacks_fails_and_one_the_champion_lacks_is_skipped():
    candidate = result("v2", [1, 1], metrics=("exact_match", "token_f1"))
    champion = result("v1", [1, 1], metrics=("exact_match",))
    missing = decide("program", [rule(metric="rouge_l", at_least=0.1)], candidate, champion)
    assert missing.passed is False and "not evaluated on rouge_l" in missing.outcomes[0].detail
    old_champion = decide("program", [rule(metric="token_f1", beat_champion_by=0.0)], candidate, champion)
    assert old_champion.outcomes[0].skipped is True and old_champion.passed is True


def test_decisions_are_reproducible_with_a_seed():
    champion = result("v1", [1, 0] * 30)
    candidate = result("v2", [1, 1, 0] * 20)
    rules = [rule(metric="exact_match", beat_champion_by=0.0, significant=True)]
    first = decide("adapter", rules, candidate, champion, seed=3)
    again = decide("adapter", rules, candidate, champion, seed=3)
    assert first.outcomes == again.outcomes


def test_markdown_names_every_rule_with_its_numbers():
    slices = ["A00-B99"] * 10 + ["C00-D49"] * 10
    champion = result("program-v1", [1] * 5 + [0] * 5 + [1] * 10, slices=slices, latency_ms=900.0)
    candidate = result("program-v2", [1] * 10 + [1] * 8 + [0] * 2, slices=slices, latency_ms=1200.0)
    rules = [
        rule(metric="icd_hierarchy", at_least=0.2),
        rule(metric="exact_match", beat_champion_by=0.0),
        rule(metric="exact_match", max_slice_drop=0.15),
        rule(metric="latency_p95_ms", at_most=1000),
    ]
    decision = decide("program", rules, candidate, champion)
    report = decision.to_markdown()
    for configured in rules:
        assert configured.describe() in report
    assert "❌ FAILED" in report and decision.summary in report
    assert "| icd_hierarchy ≥ 0.2 | 0.950" in report  # 18 right + 2 in the same category: (18 + 1) / 20
    assert "| exact_match beats champion by ≥ 0 | 0.900 | 0.750 | +0.150 [" in report
    assert "| latency_p95_ms ≤ 1000 | 1,200" in report and "❌ fail" in report
    assert "| C00-D49 | exact_match | 10 | 0.800 | 1.000 | −0.200 |" in report
    assert "program-v2" in report and "program-v1" in report


def test_decision_round_trips_through_json():
    decision = decide(
        "adapter",
        [rule(metric="exact_match", beat_champion_by=0.0), rule(metric="exact_match", at_least=0.1)],
        result("v2", [1, 1, 0]),
        result("v1", [1, 0, 0]),
    )
    restored = GateDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert restored == decision
    assert restored.metrics["exact_match"] == pytest.approx(2 / 3)  # the candidate's scores, for the registry
    assert restored.to_markdown() == decision.to_markdown()


def test_a_stored_champion_result_can_still_be_paired():
    champion = EvaluationResult.from_dict(json.loads(json.dumps(result("v1", [1, 0, 0, 0]).to_dict())))
    decision = decide(
        "adapter", [rule(metric="exact_match", beat_champion_by=0.2)], result("v2", [1, 1, 0, 0]), champion
    )
    assert decision.passed is True and decision.shared_cases == 4


@pytest.mark.parametrize("kind", ["at_least", "at_most", "beat_champion_by", "max_slice_drop"])
def test_every_rule_kind_reports_its_kind(kind):
    decision = decide(
        "program", [rule(metric="exact_match", **{kind: 0.5})], result("v2", [1, 0]), result("v1", [1, 0])
    )
    assert decision.outcomes[0].kind == kind and decision.outcomes[0].metric == "exact_match"


def test_rules_scoped_to_a_slice_or_excluding_it() -> None:
    """A feedback candidate that aces the corrections but regresses elsewhere is refused by an exclude_slice rule."""
    from cadre.config.evaluation import GateRule
    from cadre.evaluation.gates import decide
    from cadre.evaluation.results import score_predictions

    cases = [{"id": f"r{i}", "code": "A00.0", "slice": "regular"} for i in range(30)]
    cases += [{"id": f"f{i}", "code": "B00.0", "slice": "feedback"} for i in range(30)]
    champion = score_predictions(
        cases, ["A00.0"] * 30 + ["X"] * 30, ["exact_match"], name="champion", output_field="code", bootstrap_samples=200
    )
    candidate = score_predictions(
        cases,
        ["A00.0"] * 20 + ["X"] * 10 + ["B00.0"] * 30,
        ["exact_match"],
        name="candidate",
        output_field="code",
        bootstrap_samples=200,
    )
    overall = GateRule(metric="exact_match", beat_champion_by=-0.01)
    regular = GateRule(metric="exact_match", beat_champion_by=-0.01, exclude_slice="feedback")
    learned = GateRule(metric="exact_match", at_least=0.9, slice="feedback")

    assert decide("feedback", [overall], candidate, champion).passed  # 0.83 vs 0.5 overall hides the regression
    decision = decide("feedback", [overall, regular, learned], candidate, champion)
    assert not decision.passed
    by_rule = {o.rule_text: o for o in decision.outcomes}
    regression = by_rule["exact_match beats champion by ≥ -0.01 excluding slice feedback"]
    assert regression.passed is False and abs(regression.candidate - 20 / 30) < 1e-9 and regression.champion == 1.0
    assert by_rule["exact_match ≥ 0.9 on slice feedback"].passed is True
    assert "excluding slice feedback" in decision.to_markdown()


def test_without_a_champion_program_the_candidate_must_beat_the_declared_program_that_serves():
    """The prompt flow hands the declared program's scores as the baseline when no program was promoted yet."""
    from cadre.config import Specialist
    from cadre.registry.promotion import decide_gates

    settings = Specialist.model_validate(
        {
            "name": "coder",
            "description": "test",
            "program": {
                "instruction": "Code it.",
                "inputs": [{"name": "phrase"}],
                "outputs": [{"name": "code"}],
                "retrieve_k": 0,
            },
            "evaluation": {"suite": "s"},
            "gates": {"program": [{"metric": "exact_match", "beat_champion_by": 0.0}]},
        }
    )
    declared, worse = result("unoptimized", [1, 1, 0, 1, 0, 1]), result("candidate", [0, 1, 0, 0, 0, 1])
    assert not decide_gates(settings, "program", worse, declared).passed
    better = result("candidate", [1, 1, 1, 1, 0, 1])
    assert decide_gates(settings, "program", better, declared).passed
