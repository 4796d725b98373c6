"""The shared end of every flow, against a real MLflow server: gates decide, the registry follows."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cadre.config import load_config
from cadre.evaluation.results import load_cases, score_predictions
from cadre.registry.promotion import champion_version, gate_and_promote
from cadre.registry.runs import open_run
from cadre.registry.versions import history, read_gate_report

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path, mlflow_server: str):
    shutil.copytree(ROOT / "evals" / "suites" / "icd10-coder", tmp_path / "suite")
    (tmp_path / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: promo-{tmp_path.name[-6:].lower().replace("_", "-").strip("-") or "x"}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
        specialists:
          - name: coder
            description: test
            program:
              instruction: Code it.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 0
            evaluation: {{suite: suite, answer_metrics: [exact_match, icd_hierarchy], bootstrap_samples: 200}}
            gates:
              program:
                - {{metric: exact_match, at_least: 0.5}}
                - {{metric: exact_match, beat_champion_by: 0.05}}
        """)
    )
    return load_config(tmp_path / "pipelines.yaml")


def _evaluate(config, correct_fraction: float, name: str):
    cases = load_cases(config.resolve("suite"), "test", limit=60)
    cutoff = int(len(cases) * correct_fraction)
    outputs = [case["code"] if i < cutoff else "Z99.9" for i, case in enumerate(cases)]
    return score_predictions(
        cases, outputs, ["exact_match", "icd_hierarchy"], name=name, output_field="code", bootstrap_samples=200
    )


def _candidate_run(config, tmp_path: Path):
    handle = open_run(config, "coder", "optimize", "smoke", flow_run_id=None)
    program = tmp_path / "program.json"
    program.write_text('{"demo": true}')
    MlflowClient(handle.tracking_uri).log_artifact(handle.run_id, str(program), artifact_path="program")
    return handle


def test_refused_then_promoted_with_a_readable_report(config, tmp_path: Path) -> None:
    weak = _evaluate(config, 0.3, "weak")
    refused = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        weak,
        None,
        lineage={"data_fingerprint": "abc"},
        expected_champion=None,
        actor="test",
    )
    assert not refused.decision.passed and not refused.promoted
    assert champion_version(config, "coder", "program") is None

    strong = _evaluate(config, 0.8, "strong")
    promoted = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        strong,
        None,
        lineage={"data_fingerprint": "abc"},
        expected_champion=None,
        actor="test",
    )
    assert promoted.promoted
    assert champion_version(config, "coder", "program") == promoted.version

    client = MlflowClient(config.project.mlflow.uri)
    version = client.get_model_version(promoted.model_name, promoted.version)
    assert "exact_match ≥ 0.5" in version.description
    assert version.tags["cadre.lineage.data_fingerprint"] == "abc"
    assert version.tags["cadre.lineage.config_sha256"] == config.sha256
    report = read_gate_report(client, promoted.model_name, promoted.version)
    assert report["passed"] is True

    # A challenger no better than the champion by the required margin is refused; the champion stays.
    same = _evaluate(config, 0.8, "same")
    again = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        same,
        strong,
        lineage={},
        expected_champion=promoted.version,
        actor="test",
    )
    assert not again.promoted
    assert champion_version(config, "coder", "program") == promoted.version
    events = [record.event for record in history(client, config.project.name, "coder", "program")]
    assert events == ["refusal", "promotion", "refusal"]


def test_the_same_artifact_from_a_rerun_is_judged_again_not_registered_twice(config, tmp_path: Path) -> None:
    weak = _evaluate(config, 0.3, "weak")
    lineage = {"data_fingerprint": "abc", "adapter_sha256": "f00d" * 16}
    first = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        weak,
        None,
        lineage=lineage,
        expected_champion=None,
        actor="test",
        identity="adapter_sha256",
    )
    rerun = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        weak,
        None,
        lineage=lineage,
        expected_champion=None,
        actor="test",
        identity="adapter_sha256",
    )
    assert rerun.version == first.version and not rerun.promoted
    client = MlflowClient(config.project.mlflow.uri)
    assert len(client.search_model_versions(f"name = '{first.model_name}'")) == 1
    assert [record.event for record in history(client, config.project.name, "coder", "program")] == ["refusal"]

    # A different artifact is a new version; the same one judged better (new gate, better cases) is promoted.
    other = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        weak,
        None,
        lineage={**lineage, "adapter_sha256": "beef" * 16},
        expected_champion=None,
        actor="test",
        identity="adapter_sha256",
    )
    assert other.version != first.version
    strong = _evaluate(config, 0.8, "strong")
    promoted = gate_and_promote(
        config,
        "coder",
        "program",
        _candidate_run(config, tmp_path),
        "program",
        strong,
        None,
        lineage=lineage,
        expected_champion=None,
        actor="test",
        identity="adapter_sha256",
    )
    assert promoted.promoted and promoted.version == first.version
    assert champion_version(config, "coder", "program") == first.version
