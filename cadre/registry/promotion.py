"""The one promotion path: every flow that makes a candidate ends here (gates → register → promote).

A flow evaluates its candidate (an index version, a DSPy program, an adapter) and what serves now on the
same cases, logs the candidate's artifact to its MLflow run under its stage's `artifact_path`, and hands a
`Candidate` to `gate_and_promote` (through the task `tasks.promotion.promote_through_gates`). That function
is the only way a flow changes a champion, and the only place a flow run records what its gates decided:

1. decide the specialist's gates of the stage's gate kind (`decide_gates`), candidate against what serves;
2. log both evaluations to the run (unless the flow logged richer tables itself);
3. register the candidate as a version of the stage's registry kind, an MLflow model (`cadre.registry.models`):
   one with the same artifact fingerprint (`identity`) is judged again instead of registered twice, so a re-run
   registers nothing new;
4. record the decision on the version and move `champion` only if the gates passed and the champion is still
   the one the candidate was compared with (`expected_champion`; a stale decision is refused); a promotion
   registers a new version of the specialist as one model (`cadre.registry.models.register_specialist`);
5. put the gate report (after the flow's score tables, `note`) on the run, and the tags `cadre run` and the
   Prefect run summary read (`cadre.gate`, `cadre.promoted`, `cadre.candidate_version`,
   `cadre.already_champion`; see `cadre.registry.runs.run_verdict`).

What one flow does besides (the prompt registry entry of the program's instruction, its alias following a
promoted program) are steps around this call. A candidate that *is* the champion (the prompt flow compiled
the champion's program again: `same_as_champion`) is judged and reported on the run, but registers nothing
and records nothing on the registry.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion

from cadre.config import CadreConfig, Specialist
from cadre.evaluation.gates import GateDecision, decide
from cadre.evaluation.report import log_comparison_figure
from cadre.evaluation.results import EvaluationResult
from cadre.registry.models import MODEL_KINDS, ModelSpec, model_spec, register_specialist
from cadre.registry.runs import RunHandle
from cadre.registry.versions import (
    EVENT_PROMOTION,
    PromotionRecord,
    decide_and_promote,
    find_identical,
    get_champion,
    register_candidate,
    registered_model_name,
)
from cadre.stages import Stage, stage

EVENT_UNCHANGED = "unchanged"
"""The event of a candidate that is the champion itself: nothing registered, nothing recorded."""


@dataclass(frozen=True)
class Candidate:
    """What a flow hands to the promotion path.

    Attributes:
        stage: the stage that made it (`cadre.stages`): its gate kind, registry kind and artifact folder.
        scores: the candidate's evaluation.
        baseline: what serves now, evaluated on the same cases: the champion, or without one what serves in its
            place (the declared program, the bare base model); None when nothing is there to compare with.
        expected_champion: the champion version `baseline` is (None: there was none); promotion is refused as
            stale if another run moved the champion meanwhile.
        lineage: data/corpus fingerprints, base model, parent versions … (config hash and run are added).
        identity: a key of `lineage` that fingerprints the artifact itself (e.g. `adapter_sha256`). A complete
            version with the same fingerprint is judged again instead of registering the same artifact twice;
            its decision is recorded once unless the verdict changes.
        note: Markdown the flow puts before the gate report in the run's note (its score tables); also the
            registered version's candidate description.
        same_as_champion: the candidate is the champion's artifact (`expected_champion`) itself: it is judged,
            and the verdict goes on the run only.
        scores_logged: the flow logged both evaluations itself (the prompt flow's tables hold more systems).
        baselines: reference systems scored on the same cases, by the name a `beat_baseline` gate rule gives
            (`retrieval`: the first retrieved document's id as the answer).
        on_run: write the verdict on the run (its tags, note and gate report). False for a second candidate of
            the same run (the program an adapter refresh promotes beside its adapter): its verdict is on its
            registry version, and the run keeps its own candidate's.
    """

    stage: str
    scores: EvaluationResult
    baseline: EvaluationResult | None
    expected_champion: str | None
    lineage: dict[str, str] = field(default_factory=dict)
    identity: str | None = None
    note: str = ""
    same_as_champion: bool = False
    scores_logged: bool = False
    baselines: dict[str, EvaluationResult] = field(default_factory=dict)
    on_run: bool = True


@dataclass(frozen=True)
class PromotionOutcome:
    """What the gates decided about a candidate and what the registry did with it.

    Attributes:
        decision: the gate decision.
        record: the promotion or refusal recorded on the registry (None: the candidate is the champion itself).
        model_name: the registered model.
        version: the candidate's version.
    """

    decision: GateDecision
    record: PromotionRecord | None
    model_name: str
    version: str

    @property
    def promoted(self) -> bool:
        """Whether this decision made the candidate champion."""
        return (
            self.record is not None and self.record.event == EVENT_PROMOTION and self.record.to_version == self.version
        )

    @property
    def event(self) -> str:
        """`promotion`, `refusal` (as recorded), or `unchanged` (the candidate is the champion itself)."""
        return self.record.event if self.record is not None else EVENT_UNCHANGED

    @property
    def champion(self) -> str | None:
        """The champion version after the decision."""
        return self.record.to_version if self.record is not None else self.version

    def result_fields(self) -> dict[str, Any]:
        """What every gated flow returns about the decision (its Prefect result), before its own figures."""
        return {
            "event": self.event,
            "version": self.version,
            "champion": self.champion,
            "promoted": self.promoted,
            "gate_passed": self.decision.passed,
            "summary": self.decision.summary,
        }

    def summary(self) -> str:
        if self.record is None:
            return f"{self.model_name} v{self.version} is the champion itself: nothing registered or moved; {self.decision.summary}"
        verdict = "promoted to champion" if self.promoted else "passed" if self.decision.passed else "refused"
        return f"{self.model_name} v{self.version} {verdict}: {self.decision.summary}"


def champion_version(config: CadreConfig, specialist: str, registry_kind: str) -> str | None:
    """The version number the `champion` alias points at, or None."""
    client = MlflowClient(config.project.mlflow.uri)
    version = get_champion(client, config.project.name, specialist, registry_kind)
    return str(version.version) if version else None


def decide_gates(
    settings: Specialist,
    gate_kind: str,
    scores: EvaluationResult,
    baseline: EvaluationResult | None,
    references: dict[str, EvaluationResult] | None = None,
) -> GateDecision:
    """The specialist's `gate_kind` rules applied to the candidate's scores against the baseline's, on the same cases.

    With a baseline (a champion, or the declared program / base model that serves without one) the comparative
    rules judge the candidate against it: a candidate that makes the specialist worse than what serves is refused.
    """
    return decide(
        gate_kind,
        getattr(settings.gates, gate_kind),
        scores,
        baseline,
        confidence=settings.evaluation.confidence,
        samples=settings.evaluation.bootstrap_samples,
        baselines=references,
    )


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
    config: CadreConfig, specialist: str, handle: RunHandle, candidate: Candidate, actor: str
) -> PromotionOutcome:
    """Decide the candidate's gates, register it, and promote it only if they pass (see the module docstring).

    Args:
        config: the validated pipelines file.
        specialist: whose gates and registry entries.
        handle: the flow's MLflow run, which already holds the candidate's artifact at its stage's `artifact_path`.
        candidate: the evaluated candidate and what it is judged against.
        actor: who promotes (the Prefect flow run, or a person).

    Raises:
        ValueError: the stage judges no candidate, or `same_as_champion` without a champion.
        cadre.registry.versions.StaleDecisionError: the champion moved since the candidate was compared with it.
    """
    kind = _judged_stage(candidate.stage)
    decision = decide_gates(
        config.specialist(specialist), kind.gate, candidate.scores, candidate.baseline, candidate.baselines
    )
    if not candidate.scores_logged:
        log_evaluation(handle, candidate.scores, "candidate")
        if candidate.baseline is not None:
            log_evaluation(handle, candidate.baseline, "champion")
    client = MlflowClient(config.project.mlflow.uri)
    project = config.project.name
    if candidate.same_as_champion:
        if candidate.expected_champion is None:
            raise ValueError("same_as_champion needs the champion version (expected_champion)")
        name = registered_model_name(project, specialist, kind.registry_kind)
        outcome = PromotionOutcome(decision, None, name, candidate.expected_champion)
    else:
        version = _registered_version(config, specialist, handle, candidate, kind, client, actor)
        record = decide_and_promote(
            client,
            project=project,
            specialist=specialist,
            kind=kind.registry_kind,
            version=version.version,
            decision=decision,
            actor=actor,
            reason=decision.summary,
            expected_champion=candidate.expected_champion,
        )
        outcome = PromotionOutcome(decision, record, version.name, str(version.version))
        if outcome.promoted:
            composite = register_specialist(
                config,
                specialist,
                handle.run_id,
                actor=actor,
                reason=f"Follows {outcome.model_name} v{outcome.version}.",
            )
            if composite is not None and config.specialist(specialist).edge.export_on_promotion:
                from cadre.edge.judge import publish_after_promotion

                publish_after_promotion(config, specialist, composite.name, str(composite.version), handle.run_id)
    if candidate.on_run:
        _report_on_run(client, handle, candidate, outcome)
    return outcome


def _judged_stage(name: str) -> Stage:
    found = stage(name)
    if found.gate is None or found.registry_kind is None or found.artifact_path is None:
        raise ValueError(f"the {name} stage makes no candidate to promote")
    return found


def _registered_version(
    config: CadreConfig,
    specialist: str,
    handle: RunHandle,
    candidate: Candidate,
    kind: Stage,
    client: MlflowClient,
    actor: str,
) -> ModelVersion:
    """The candidate's complete registry version: one with the same artifact fingerprint, else a new one."""
    if candidate.identity is not None:
        value = candidate.lineage[candidate.identity]
        same = find_identical(
            client,
            project=config.project.name,
            specialist=specialist,
            kind=kind.registry_kind,
            lineage_key=candidate.identity,
            value=value,
        )
        if same is not None:
            print(
                f"the candidate is identical to {same.name} v{same.version} ({candidate.identity} {value[:12]}); "
                "judging that version again instead of registering it twice"
            )
            return same
    return register_candidate(
        client,
        project=config.project.name,
        specialist=specialist,
        kind=kind.registry_kind,
        run_id=handle.run_id,
        artifact_path=kind.artifact_path,
        lineage={"config_sha256": config.sha256, **candidate.lineage},
        actor=actor,
        description=candidate.note or f"{kind.gate} candidate for {specialist}, made by run {handle.run_id}",
        model=_model_spec(config, specialist, kind.registry_kind, candidate),
    )


def _model_spec(config: CadreConfig, specialist: str, kind: str, candidate: Candidate) -> ModelSpec | None:
    """What makes the candidate's folder an MLflow model (kinds without a Cadre pyfunc are registered as folders)."""
    if kind not in MODEL_KINDS:
        return None
    return model_spec(config, specialist, kind, index_version=candidate.lineage.get("index_version"))


def _report_on_run(client: MlflowClient, handle: RunHandle, candidate: Candidate, outcome: PromotionOutcome) -> None:
    """The gate report as an artifact and as the run's note (after the flow's tables); the verdict as tags."""
    decision = outcome.decision
    report = decision.to_markdown()
    client.log_text(handle.run_id, report, "gate/gate_report.md")
    client.log_dict(handle.run_id, decision.to_dict(), "gate/gate_report.json")
    log_comparison_figure(handle.tracking_uri, handle.run_id, candidate.scores, candidate.baseline)
    client.log_batch(handle.run_id, metrics=[Metric("gate_passed", float(decision.passed), int(time.time() * 1000), 0)])
    already = outcome.record is None or (decision.passed and candidate.expected_champion == outcome.version)
    for key, value in {
        "mlflow.note.content": f"{candidate.note}\n\n{report}" if candidate.note else report,
        "cadre.gate": "passed" if decision.passed else "refused",
        "cadre.candidate_version": f"{outcome.model_name}/{outcome.version}",
        "cadre.promoted": str(outcome.promoted).lower(),
        "cadre.already_champion": str(already).lower(),
    }.items():
        client.set_tag(handle.run_id, key, value)
