"""What a reviewer reads in MLflow's and Prefect's lists: verdicts, states, champion aliases moved by hand, figures.

Pure logic over tags and history records; the figures are drawn from real evaluations (`evaluate_cases`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib.image
import pytest

from cadre.evaluation.report import comparison_figure
from cadre.evaluation.results import Prediction, evaluate_cases
from cadre.orchestration.run_page import verdict_state
from cadre.registry.lineage import lineage_markdown
from cadre.registry.runs import verdict_word
from cadre.registry.versions import PromotionRecord
from cadre.registry.view import alias_outside_history
from cadre.tuning.loss_curve import write_loss_curve

CASES = [{"id": str(i), "text": f"case {i}", "code": f"C{i % 3}"} for i in range(12)]


def scored(name: str, right: int):
    return evaluate_cases(
        CASES,
        lambda case: Prediction(output=case["code"] if int(case["id"]) < right else "wrong"),
        ["exact_match"],
        name=name,
        output_field="code",
        bootstrap_samples=50,
    )


@pytest.mark.parametrize(
    ("tags", "status", "word"),
    [
        ({"cadre.gate": "passed", "cadre.promoted": "true", "cadre.already_champion": "false"}, "FINISHED", "promoted"),
        (
            {"cadre.gate": "refused", "cadre.promoted": "false", "cadre.already_champion": "false"},
            "FINISHED",
            "refused",
        ),
        (
            {"cadre.gate": "passed", "cadre.promoted": "false", "cadre.already_champion": "true"},
            "FINISHED",
            "unchanged",
        ),
        ({"cadre.gate": "passed", "cadre.promoted": "false", "cadre.already_champion": "false"}, "FINISHED", "passed"),
        ({"cadre.outcome": "unchanged"}, "FINISHED", "unchanged"),
        ({"cadre.outcome": "not_enough_corrections"}, "FINISHED", "unchanged"),
        ({"cadre.gate": "refused"}, "FAILED", "failed"),
        ({}, "KILLED", "killed"),
        ({"cadre.flow": "check"}, "FINISHED", ""),
    ],
)
def test_the_verdict_word_of_a_run(tags: dict[str, str], status: str, word: str) -> None:
    assert verdict_word(tags, status) == word


def test_a_refused_flow_run_ends_in_a_state_named_refused_that_says_which_version() -> None:
    tags = {
        "cadre.gate": "refused",
        "cadre.promoted": "false",
        "cadre.already_champion": "false",
        "cadre.candidate_version": "demo.coder.program/4",
    }
    state = verdict_state(tags, {"promoted": False})
    assert state.is_completed() and state.name == "Refused"
    assert state.message.startswith("demo.coder.program v4: gate refused")
    assert "[" not in state.message  # no rich markup in the Prefect UI

    promoted = verdict_state({**tags, "cadre.gate": "passed", "cadre.promoted": "true"}, {})
    assert promoted.name == "Promoted"
    assert verdict_state({"cadre.flow": "check"}, {}).name == "Completed"


def record(seq: int, event: str, version: str, to_version: str | None, kind: str = "program") -> PromotionRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=seq)
    return PromotionRecord(
        event=event,
        project="demo",
        specialist="coder",
        kind=kind,
        model_name=f"demo.coder.{kind}",
        version=version,
        from_version=None,
        to_version=to_version,
        at=at,
        actor="test",
        seq=seq,
    )


def test_a_champion_alias_moved_outside_the_history_is_flagged() -> None:
    events = [record(1, "promotion", "1", "1"), record(2, "promotion", "2", "2"), record(3, "refusal", "3", "2")]
    assert alias_outside_history(events, "program", "2") is None
    moved = alias_outside_history(events, "program", "3")  # v3 was refused; someone pressed "Promote" in MLflow
    assert moved is not None and "moved outside Cadre" in moved and "v2" in moved and "rollback" in moved

    rolled_back = [*events, record(4, "rollback", "1", "1")]
    assert alias_outside_history(rolled_back, "program", "1") is None
    assert alias_outside_history(rolled_back, "program", "2") is not None

    assert alias_outside_history([], "program", "1") is not None  # a champion Cadre never promoted
    assert alias_outside_history(events, "adapter", "1") is not None  # another kind's history says nothing
    retired = [record(1, "promotion", "1", "1"), record(2, "retirement", "1", None)]
    assert "no champion" in alias_outside_history(retired, "program", "1")


def test_the_comparison_figure_has_a_panel_per_metric_with_both_systems(tmp_path: Path) -> None:
    champion, candidate = scored("champion v1", 6), scored("candidate", 10)
    one = comparison_figure(candidate, champion, tmp_path / "one.png")
    image = matplotlib.image.imread(one)
    assert image.shape[0] > 300 and image.shape[1] > 400

    wider = evaluate_cases(
        CASES,
        lambda case: Prediction(output=case["code"]),
        ["exact_match", "token_f1"],
        name="candidate",
        output_field="code",
        bootstrap_samples=50,
    )
    two = comparison_figure(wider, champion, tmp_path / "nested" / "two.png")
    assert two.exists() and matplotlib.image.imread(two).shape[1] > image.shape[1]  # one more panel
    alone = comparison_figure(candidate, None, tmp_path / "alone.png")
    assert alone.exists()


def test_the_loss_chart_shows_the_heldout_loss(tmp_path: Path) -> None:
    curve = [{"step": float(s), "loss": 3.0 - 0.2 * s} for s in range(1, 9)]
    plain = write_loss_curve(curve, tmp_path / "plain")[1]
    with_heldout = write_loss_curve(curve, tmp_path / "heldout", heldout_loss=2.2)[1]
    assert plain.read_bytes() != with_heldout.read_bytes()
    table = (tmp_path / "heldout" / "loss_curve.csv").read_text().splitlines()
    assert table[0] == "step,loss" and len(table) == 9
    write_loss_curve(curve, tmp_path / "nan", heldout_loss=float("nan"))  # nothing drawn, nothing raised


def test_the_lineage_reads_as_a_table_with_links_to_the_run_and_the_parent_versions() -> None:
    tags = {
        "cadre.lineage.run_id": "0123456789abcdef0123",
        "cadre.lineage.parent_versions": "program:3,adapter:-",
        "cadre.lineage.data_fingerprint": "f" * 64,
        "cadre.lineage.base_model": "gemma3-270m",
        "cadre.lineage.lm": "llama.cpp|gemma",
        "cadre.gate": "passed",
    }
    text = lineage_markdown(tags, "demo", "coder")
    assert text.startswith("### Lineage\n")
    view = "?workflowType=machine_learning"  # MLflow's model-training view, where runs and versions are listed
    assert f"[0123456789ab](#/runs/0123456789abcdef0123{view})" in text
    assert f"[program v3](#/models/demo.coder.program/versions/3{view}), adapter: none" in text
    assert "`ffffffffffffffff…`" in text and "f" * 20 not in text  # a hash is shortened
    assert "| lm | llama.cpp\\|gemma |" in text  # a pipe in a value does not break the table
    assert "passed" not in text  # only lineage tags
    assert text.index("made by run") < text.index("parent versions") < text.index("base model")
    assert lineage_markdown({"cadre.gate": "passed"}, "demo", "coder") == ""
    assert "`live-2026-01-01`" in lineage_markdown({"cadre.lineage.parent_versions": "live-2026-01-01"}, "d", "c")
