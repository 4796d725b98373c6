"""The shared end of every flow, against a real MLflow server: gates decide, the registry follows."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import project_name

from cadre.config import load_config
from cadre.evaluation.results import load_cases, score_predictions
from cadre.registry.promotion import Candidate, champion_version, gate_and_promote
from cadre.registry.runs import open_run, run_verdict
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
          name: {project_name("promo", tmp_path)}
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
        _candidate_run(config, tmp_path),
        Candidate("optimize", weak, None, None, {"data_fingerprint": "abc"}),
        actor="test",
    )
    assert not refused.decision.passed and not refused.promoted
    assert champion_version(config, "coder", "program") is None

    strong = _evaluate(config, 0.8, "strong")
    promoted = gate_and_promote(
        config,
        "coder",
        _candidate_run(config, tmp_path),
        Candidate("optimize", strong, None, None, {"data_fingerprint": "abc"}),
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
        _candidate_run(config, tmp_path),
        Candidate("optimize", same, strong, promoted.version, {}),
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
        _candidate_run(config, tmp_path),
        Candidate("optimize", weak, None, None, lineage, identity="adapter_sha256"),
        actor="test",
    )
    rerun = gate_and_promote(
        config,
        "coder",
        _candidate_run(config, tmp_path),
        Candidate("optimize", weak, None, None, lineage, identity="adapter_sha256"),
        actor="test",
    )
    assert rerun.version == first.version and not rerun.promoted
    client = MlflowClient(config.project.mlflow.uri)
    assert len(client.search_model_versions(f"name = '{first.model_name}'")) == 1
    assert [record.event for record in history(client, config.project.name, "coder", "program")] == ["refusal"]

    # A different artifact is a new version; the same one judged better (new gate, better cases) is promoted.
    other = gate_and_promote(
        config,
        "coder",
        _candidate_run(config, tmp_path),
        Candidate("optimize", weak, None, None, {**lineage, "adapter_sha256": "beef" * 16}, identity="adapter_sha256"),
        actor="test",
    )
    assert other.version != first.version
    strong = _evaluate(config, 0.8, "strong")
    promoted = gate_and_promote(
        config,
        "coder",
        _candidate_run(config, tmp_path),
        Candidate("optimize", strong, None, None, lineage, identity="adapter_sha256"),
        actor="test",
    )
    assert promoted.promoted and promoted.version == first.version
    assert champion_version(config, "coder", "program") == first.version


def test_a_candidate_that_is_the_champion_itself_registers_and_records_nothing(config, tmp_path: Path) -> None:
    """The prompt flow compiled the champion's program again: judged and reported on the run, nothing on the registry."""
    strong = _evaluate(config, 0.8, "strong")
    lineage = {"program_sha256": "ab" * 32}
    first_run = _candidate_run(config, tmp_path)
    first = gate_and_promote(
        config,
        "coder",
        first_run,
        Candidate("optimize", strong, None, None, lineage, identity="program_sha256", note="### first"),
        actor="test",
    )
    client = MlflowClient(config.project.mlflow.uri)
    tags = client.get_run(first_run.run_id).data.tags
    assert first.promoted and tags["cadre.promoted"] == "true"
    assert run_verdict(tags) == "[green]gate passed: the candidate is the new champion[/green]"
    assert (
        tags["mlflow.note.content"].startswith("### first\n\n") and "exact_match ≥ 0.5" in tags["mlflow.note.content"]
    )
    version = client.get_model_version(first.model_name, first.version)
    assert version.description.endswith("### Candidate\n\n### first")  # the note is in the description, not a tag
    assert "cadre.candidate_description" not in version.tags

    rerun = _candidate_run(config, tmp_path)
    same = gate_and_promote(
        config,
        "coder",
        rerun,
        Candidate("optimize", strong, strong, first.version, lineage, identity="program_sha256", same_as_champion=True),
        actor="test",
    )
    # `beat_champion_by: 0.05` fails against itself; a refusal is not recorded against the serving champion.
    assert (same.event, same.version, same.champion, same.promoted) == (
        "unchanged",
        first.version,
        first.version,
        False,
    )
    assert len(client.search_model_versions(f"name = '{first.model_name}'")) == 1
    assert [record.event for record in history(client, config.project.name, "coder", "program")] == ["promotion"]
    assert client.get_model_version(first.model_name, first.version).tags["cadre.gate"] == "passed"
    tags = client.get_run(rerun.run_id).data.tags
    assert tags["cadre.candidate_version"] == f"{first.model_name}/{first.version}"
    assert run_verdict(tags).startswith("[yellow]the candidate is the champion itself; it stays")
