"""The end every flow shares: log the evaluation, decide the gates, register, promote only if they pass.

A flow evaluates its candidate (an index version, a DSPy program, an adapter) and the current champion
on the same cases, logs the candidate's artifact to its MLflow run, then calls `gate_and_promote`.
That function is the only way a flow changes a champion.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from cadre.config import CadreConfig
from cadre.evaluation.gates import GateDecision, decide
from cadre.evaluation.results import EvaluationResult
from cadre.registry.runs import RunHandle
from cadre.registry.versions import (
    EVENT_PROMOTION,
    PromotionRecord,
    decide_and_promote,
    find_identical,
    get_champion,
    register_candidate,
)

ARTIFACT_OF_GATE = {"index": "index", "program": "program", "adapter": "adapter", "feedback": "adapter"}


@dataclass(frozen=True)
class PromotionOutcome:
    """What the gates decided about a candidate and what the registry did with it."""

    decision: GateDecision
    record: PromotionRecord
    model_name: str
    version: str

    @property
    def promoted(self) -> bool:
        return self.record.event == EVENT_PROMOTION

    def summary(self) -> str:
        verdict = "promoted to champion" if self.decision.passed else "refused"
        return f"{self.model_name} v{self.version} {verdict}: {self.decision.summary}"


def champion_version(config: CadreConfig, specialist: str, artifact_kind: str) -> str | None:
    """The version number the `champion` alias points at, or None."""
    client = MlflowClient(config.project.mlflow.uri)
    version = get_champion(client, config.project.name, specialist, artifact_kind)
    return str(version.version) if version else None


def log_evaluation(handle: RunHandle, result: EvaluationResult, prefix: str) -> None:
    """Aggregates as metrics (`<prefix>_<metric>`), per-example rows as a table, the full result as JSON."""
    client = MlflowClient(handle.tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}_{key}", float(value), now, 0) for key, value in result.mlflow_metrics().items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(handle.run_id, metrics=metrics[start : start + 500])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{prefix}.json"
        path.write_text(json.dumps(result.to_dict(), indent=1, default=str))
        client.log_artifact(handle.run_id, str(path), artifact_path="evaluation")
    if result.rows():
        mlflow.set_tracking_uri(handle.tracking_uri)
        mlflow.log_table(result.columns(), artifact_file=f"evaluation/{prefix}_cases.json", run_id=handle.run_id)


def gate_and_promote(
    config: CadreConfig,
    specialist: str,
    gate_kind: str,
    handle: RunHandle,
    artifact_path: str,
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    lineage: dict[str, str],
    expected_champion: str | None,
    actor: str,
    identity: str | None = None,
) -> PromotionOutcome:
    """Decide the specialist's `gate_kind` gates, register the candidate, and promote it only if they pass.

    Args:
        config: the validated pipelines file.
        specialist: whose gates and registry entries.
        gate_kind: `index`, `program`, `adapter` or `feedback` (a feedback adapter registers as `adapter`).
        handle: the flow's MLflow run, which already holds the candidate's artifact at `artifact_path`.
        candidate: the candidate's evaluation.
        champion: the champion's evaluation on the same cases (None when there is no champion yet).
        lineage: data/corpus fingerprints, base model, parent versions … (config hash and run are added).
        expected_champion: the champion version the candidate was compared with; promotion is refused as
            stale if another run changed the champion meanwhile.
        actor: who promotes (the Prefect flow run, or a person).
        identity: a key of `lineage` that fingerprints the artifact itself (e.g. `adapter_sha256`). A complete
            version with the same fingerprint is judged again instead of registering the same artifact twice;
            its decision is recorded once unless the verdict changes.
    """
    settings = config.specialist(specialist)
    rules = getattr(settings.gates, gate_kind)
    decision = decide(
        gate_kind,
        rules,
        candidate,
        champion,
        confidence=settings.evaluation.confidence,
        samples=settings.evaluation.bootstrap_samples,
    )
    log_evaluation(handle, candidate, "candidate")
    if champion is not None:
        log_evaluation(handle, champion, "champion")
    client = MlflowClient(config.project.mlflow.uri)
    artifact_kind = ARTIFACT_OF_GATE[gate_kind]
    version = None
    if identity is not None:
        version = find_identical(
            client,
            project=config.project.name,
            specialist=specialist,
            kind=artifact_kind,
            lineage_key=identity,
            value=lineage[identity],
        )
        if version is not None:
            print(
                f"the candidate is identical to {version.name} v{version.version} ({identity} {lineage[identity][:12]}); "
                "judging that version again instead of registering it twice"
            )
    if version is None:
        version = register_candidate(
            client,
            project=config.project.name,
            specialist=specialist,
            kind=artifact_kind,
            run_id=handle.run_id,
            artifact_path=artifact_path,
            lineage={"config_sha256": config.sha256, **lineage},
            actor=actor,
            description=f"{gate_kind} candidate for {specialist}, made by run {handle.run_id}",
        )
    record = decide_and_promote(
        client,
        project=config.project.name,
        specialist=specialist,
        kind=artifact_kind,
        version=version.version,
        decision=decision,
        actor=actor,
        reason=decision.summary,
        expected_champion=expected_champion,
    )
    report_markdown = decision.to_markdown()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "gate_report.md"
        report.write_text(report_markdown)
        client.log_artifact(handle.run_id, str(report), artifact_path="gate")
    client.set_tag(handle.run_id, "mlflow.note.content", report_markdown)  # flows with score tables write a fuller one
    client.set_tag(handle.run_id, "cadre.gate", "passed" if decision.passed else "refused")
    client.set_tag(handle.run_id, "cadre.candidate_version", f"{version.name}/{version.version}")
    client.set_tag(
        handle.run_id,
        "cadre.already_champion",
        str(decision.passed and expected_champion == str(version.version)).lower(),
    )
    return PromotionOutcome(decision=decision, record=record, model_name=version.name, version=str(version.version))
