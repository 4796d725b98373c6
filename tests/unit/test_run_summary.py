"""What `cadre run` prints after a flow: the gate's verdict and the metrics the gates judged."""

from __future__ import annotations

from pathlib import Path

from cadre.config import load_config
from cadre.orchestration.deployments import key_metrics
from cadre.registry.runs import run_verdict, skipped_summary

ROOT = Path(__file__).resolve().parents[2]


def test_key_metrics_are_the_ones_the_flows_gates_judge() -> None:
    config = load_config(ROOT / "pipelines.yaml")
    metrics = {
        "candidate_cases": 300.0,
        "candidate_recall_at_10": 0.91,
        "champion_recall_at_10": 0.88,
        "candidate_mrr": 0.6,
        "candidate_exact_match": 0.4,
    }  # as MLflow stores them: `@` is not allowed in a metric name
    assert key_metrics(config, "icd10-coder", "reindex", metrics) == {
        "candidate_recall_at_10": 0.91,
        "champion_recall_at_10": 0.88,
        "candidate_mrr": 0.6,
    }
    assert key_metrics(config, "icd10-coder", "refresh", metrics) == {"candidate_exact_match": 0.4}
    assert list(key_metrics(config, "icd10-coder", "check", metrics)) == sorted(metrics)
    ungated = load_config(ROOT / "pipelines.yaml")
    ungated.specialist("icd10-coder").gates.adapter = []  # a new specialist that only gates its program
    assert key_metrics(
        ungated, "icd10-coder", "refresh", {**metrics, "adapter_gguf_mb": 7.6, "candidate_icd_hierarchy": 0.5}
    ) == {"candidate_exact_match": 0.4, "candidate_icd_hierarchy": 0.5}


def test_the_verdict_line_says_promoted_refused_or_nothing_to_learn() -> None:
    assert "new champion" in run_verdict({"cadre.gate": "passed", "cadre.promoted": "true"})
    assert "refused" in run_verdict({"cadre.gate": "refused", "cadre.promoted": "false"})
    assert "did not move" in run_verdict({"cadre.gate": "passed", "cadre.promoted": "false"})
    assert "not enough corrections" in run_verdict({"cadre.outcome": "not_enough_corrections"})
    assert run_verdict({}) == ""
    assert "no source changed" in run_verdict({"cadre.outcome": "unchanged", "cadre.index_version": ""})
    again = run_verdict(
        {
            "cadre.gate": "passed",
            "cadre.promoted": "true",
            "cadre.already_champion": "true",
            "cadre.candidate_version": "cadre-demo.coder.adapter/3",
        }
    )
    assert "champion already (v3)" in again and "new champion" not in again


def test_skipped_input_is_summarised_in_one_line():
    line = skipped_summary(
        {
            "skipped_malformed": 3,
            "skipped_empty": 2,
            "skipped_undecodable": 0,
            "documents_skipped": 5,
            "data_invalid": 4,
            "recall_at_10": 0.9,
        }
    )
    assert line.startswith("bad input skipped and counted: ")
    assert "empty 2, malformed 3" in line and "undecodable" not in line
    assert "invalid training records 4" in line
    assert skipped_summary({"skipped_malformed": 0, "recall_at_10": 0.9}) == ""
