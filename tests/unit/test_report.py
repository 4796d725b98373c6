"""The score tables reviewers read in a run's note, the loss curve artifacts, and the run budget's plans.

Results come from the real evaluation (`evaluate_cases` on small cases); the plans from the shipped pipelines.yaml.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cadre.config import load_config
from cadre.config.budget import RUN_BUDGETS, parse_budget, plan_reindex
from cadre.evaluation.comparison import AdapterScores, TestScores
from cadre.evaluation.report import adapter_score_table, program_score_table, slice_table, split_scores
from cadre.evaluation.results import Prediction, evaluate_cases
from cadre.feedback.store import FEEDBACK_SLICE
from cadre.prompts.optimize import EvaluationRun, plan_optimization
from cadre.prompts.program import LMUsage
from cadre.tuning.dpo import plan_feedback
from cadre.tuning.finetune import plan_refresh
from cadre.tuning.loss_curve import write_loss_curve

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    {"id": "a", "text": "typhoid", "code": "A01", "slice": FEEDBACK_SLICE},
    {"id": "b", "text": "cholera", "code": "A00"},
    {"id": "c", "text": "plague", "code": "A20"},
    {"id": "d", "text": "anthrax", "code": "A22"},
]


def scored(name: str, answers: dict[str, str]):
    return evaluate_cases(
        CASES,
        lambda case: Prediction(output=answers.get(case["id"])),
        ["exact_match"],
        name=name,
        output_field="code",
        bootstrap_samples=50,
    )


def adapter_scores() -> AdapterScores:
    champion = scored("base-model", {"b": "A00"})  # wrong on the feedback case, right on one of three others
    candidate = scored("candidate-adapter", {"a": "A01", "b": "A00", "c": "A20"})
    return AdapterScores(EvaluationRun(candidate, LMUsage(), 12.4), EvaluationRun(champion, LMUsage(), 9.6), False)


def test_the_program_table_lists_every_system_on_the_test_split_and_the_compile_cost() -> None:
    scores = TestScores(
        baseline=scored("champion-v3", {"a": "A01"}),
        candidate=scored("candidate", {"a": "A01", "b": "A00"}),
        retrieval_only=scored("retrieval", {}),
        baseline_is_champion=True,
        costs={"baseline": {"lm_calls": 4, "wall_seconds": 2.25}, "candidate": {"lm_calls": 7.0, "wall_seconds": 3}},
    )
    summary = {"optimizer": "mipro", "compile_lm_calls": 40, "compile_lm_cache_hits": 5, "compile_tokens": 900}
    table = program_score_table(scores, summary).splitlines()

    assert table[0] == "### Test split: 4 cases, 95% bootstrap intervals"
    assert table[2] == "| system | exact_match | outside | LM calls | wall s |"
    assert table[4] == "| retrieval only (its top-1 document as the answer) | 0.000 [0.000, 0.000] | — | 0 | 0.0 |"
    assert table[5] == "| champion-v3 (champion) | 0.250 [0.000, 0.750] | — | 4 | 2.2 |"
    assert table[6] == "| candidate (answers free) | 0.500 [0.000, 1.000] | — | 7 | 3.0 |"
    assert table[-1] == "Compile: mipro, 40 LM calls (5 cache hits), 900 tokens, $0.0000, 0.0 s."

    from dataclasses import replace

    retrieved = evaluate_cases(
        CASES,
        lambda case: Prediction(output="A01", retrieved_ids=["A01", "A00"]),
        ["exact_match"],
        name="candidate",
        output_field="code",
        bootstrap_samples=50,
    )
    ids = program_score_table(replace(scores, candidate=retrieved), summary).splitlines()
    assert ids[6].split(" | ")[2] == "0.000"  # every answer among the retrieved ids
    texts = program_score_table(replace(scores, candidate=retrieved, answers_are_ids=False), summary).splitlines()
    assert texts[6].split(" | ")[2] == "—"  # answers are texts (a pronunciation): never a retrieved id

    before = replace(scores, retrieval_configured=scored("retrieval-top1-v20261201", {}))
    rows = program_score_table(before, summary).splitlines()
    assert rows[4].startswith(
        "| retrieval only, the configured embedder, hybrid (index v20261201, before the embedder refresh) | 0.000"
    )
    assert rows[5].startswith("| retrieval only, the live index (its top-1 document as the answer) |")

    declared = TestScores(scores.baseline, scores.candidate, None, False, {})
    stopped = program_score_table(declared, {**summary, "stopped_by_budget": True, "stop_reason": "max_lm_calls"})
    assert "| champion-v3 (declared program) |" in stopped and "retrieval only" not in stopped
    assert stopped.endswith("; stopped by the budget: max_lm_calls.")


def test_the_adapter_table_puts_the_champion_first_then_the_candidate_then_the_paired_difference() -> None:
    assert adapter_score_table(adapter_scores()).splitlines() == [
        "### Test split: 4 cases, same program and retrieval, 95% bootstrap intervals",
        "",
        "| system | exact_match | wall s |",
        "|---|---|---|",
        "| base-model | 0.250 [0.000, 0.694] | 10 |",
        "| candidate-adapter | 0.750 [0.250, 1.000] | 12 |",
        "| Δ candidate − base-model (paired) | +0.500 [+0.000, +0.944] | |",  # both resampled on the same cases
    ]


def test_the_feedback_slice_is_scored_apart_from_the_rest_of_the_test_split() -> None:
    scores = adapter_scores()
    assert slice_table(scores).splitlines()[2:] == [
        "| feedback slice (1) | base-model | 0.000 |",
        "| feedback slice (1) | candidate-adapter | 1.000 |",
        "| test split (3) | base-model | 0.333 |",
        "| test split (3) | candidate-adapter | 0.667 |",
    ]
    split = split_scores(scores)
    assert split["candidate_feedback"] == {"exact_match": 1.0}
    assert split["champion_feedback"] == {"exact_match": 0.0}
    assert split["candidate_test"]["exact_match"] == pytest.approx(2 / 3)


def test_the_loss_curve_is_written_as_a_table_and_a_plot(tmp_path: Path) -> None:
    curve = [{"step": 1, "loss": 2.5, "learning_rate": 1e-4}, {"step": 2, "loss": 1.75, "learning_rate": 9e-5}]
    table, plot = write_loss_curve(curve, tmp_path / "training")

    with table.open() as rows:
        read = list(csv.DictReader(rows))
    assert list(read[0]) == ["step", "learning_rate", "loss"]
    assert [float(row["loss"]) for row in read] == [2.5, 1.75]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_stage_reads_the_budget_once_into_its_plan_and_refuses_an_unknown_one() -> None:
    specialist = load_config(ROOT / "pipelines.yaml").specialist("icd10-coder")
    smoke = specialist.smoke
    assert RUN_BUDGETS == ("smoke", "full")

    assert plan_reindex(specialist, "smoke").max_documents == smoke.max_documents
    assert plan_reindex(specialist, "full").max_documents == specialist.index.max_documents
    assert plan_reindex(specialist, "smoke").eval_cases == smoke.max_eval_cases
    assert plan_feedback(specialist, "smoke").max_steps == min(specialist.feedback.max_steps, smoke.max_train_steps)
    assert plan_feedback(specialist, "full").eval_cases == specialist.evaluation.max_cases
    assert plan_refresh(specialist, "smoke").eval_cases == smoke.max_eval_cases
    assert plan_refresh(specialist, "full").decoding_dev_cases is None  # the ICD coder answers as its program does
    pronouncer = load_config(ROOT / "pipelines.yaml").specialist("pronouncer")
    assert plan_refresh(pronouncer, "full").decoding_dev_cases == pronouncer.tuning.decoding_dev_cases == 50
    assert plan_refresh(pronouncer, "smoke").decoding_dev_cases is None  # the demo's smoke refresh does not re-choose
    keen = pronouncer.model_copy(update={"smoke": pronouncer.smoke.model_copy(update={"decoding_dev_cases": 4})})
    assert plan_refresh(keen, "smoke").decoding_dev_cases == 4

    for plan in (plan_reindex, plan_feedback, plan_refresh, plan_optimization):
        with pytest.raises(ValueError, match="unknown budget 'huge'; expected 'smoke' or 'full'"):
            plan(specialist, "huge")
    with pytest.raises(ValueError, match="unknown budget 'Smoke'"):
        parse_budget("Smoke")


def test_a_flow_refuses_an_unknown_budget_before_it_runs() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.optimize_prompts import optimize_prompts

    accepted = optimize_prompts.validate_parameters({"specialist": "x", "config_path": "p", "budget": "smoke"})
    assert accepted["budget"] == "smoke"
    with pytest.raises(ParameterTypeError, match="budget"):
        optimize_prompts.validate_parameters({"specialist": "x", "config_path": "p", "budget": "huge"})


def test_the_refresh_says_which_answer_mode_its_candidate_was_judged_with_and_why() -> None:
    """`CandidateDecoding`: every try on dev with the serving one first; a re-chosen mode, or the serving one kept
    because the program answering the better way would be refused."""
    from cadre.prompts.optimize import AnswerChoice
    from tasks.refresh import CandidateDecoding

    tried = [
        AnswerChoice("score", 5, 0.310, None, 12, 0.0, 100.0),
        AnswerChoice("free", 5, 0.000, None, 12, 0.0),
        AnswerChoice("score", 5, 0.326, None, 12, 0.0, 0.0),
    ]
    chosen = CandidateDecoding(setup="with-score-w0", changed=True, tried=tried, folder="/run/program", chosen_at=2)
    assert chosen.chosen.label == "score (retrieval weight 0) k=5"
    assert (
        chosen.summary().splitlines()[0]
        == "Answer mode on 12 dev cases with the candidate adapter (re-chosen for the candidate):"
    )
    assert "| score (retrieval weight 100) k=5 (serving) | 0.310 |" in chosen.summary()

    kept = chosen.kept("serving", "the program answering score (retrieval weight 0) k=5 would be refused")
    assert (kept.setup, kept.changed, kept.folder, kept.chosen.label) == ("serving", False, None, tried[0].label)
    assert "(kept: the program answering score (retrieval weight 0) k=5 would be refused)" in kept.summary()
