"""The stage table: every stage of a specialist's life cycle, named once.

A stage is one Prefect flow, deployed once per specialist. It makes a candidate of one registry kind,
judges it with one kind of gate and, if the gates pass, moves that kind's `champion` alias. Every other
list of stages in Cadre (the schedules a specialist may declare, the flows `cadre deploy` creates, the
order of the demo cycle, the gate kind of a flow, the registry kinds) is derived from `STAGES`.

Adding a stage is one entry here plus its flow under `flows/`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage of the life cycle.

    Attributes:
        name: What users type and write: `cadre run NAME`, `schedules.NAME` in pipelines.yaml.
        flow: The Prefect flow's name; deployments are `<flow>/<specialist>` in the Prefect UI.
        entrypoint: `module:function` of the flow.
        gate: The key under a specialist's `gates:` whose rules judge the candidate (None: nothing is judged).
        registry_kind: The registered model it promotes, `<project>.<specialist>.<registry_kind>` (None: none).
        artifact_path: Where the candidate lies in the flow's MLflow run, the folder that is registered.
        scheduled: Whether a specialist declares a schedule for it (`schedules.NAME`).
        judges_retrieval: Its gates read the suite's retrieval metrics (else its answer metrics).
        timeout_hours: A flow run still going after this long fails (Prefect's flow timeout): a backstop against a
            hung run holding its deployment's only slot, generous enough for a full-budget run on a CPU.
    """

    name: str
    flow: str
    entrypoint: str
    gate: str | None = None
    registry_kind: str | None = None
    artifact_path: str | None = None
    scheduled: bool = True
    judges_retrieval: bool = False
    timeout_hours: float = 12.0

    def flow_object(self) -> Any:
        """The Prefect flow (imports its module)."""
        module, _, function = self.entrypoint.partition(":")
        return getattr(importlib.import_module(module), function)


STAGES: tuple[Stage, ...] = (
    Stage(
        "reindex",
        "reindex",
        "flows.reindex:reindex",
        gate="index",
        registry_kind="index",
        artifact_path="index",
        judges_retrieval=True,
    ),
    Stage(
        "embedder",
        "refresh-embedder",
        "flows.refresh_embedder:refresh_embedder",
        gate="embedder",
        registry_kind="embedder",
        artifact_path="embedder",
        judges_retrieval=True,
        timeout_hours=24.0,
    ),
    Stage(
        "optimize",
        "optimize-prompts",
        "flows.optimize_prompts:optimize_prompts",
        gate="program",
        registry_kind="program",
        artifact_path="program",
    ),
    Stage(
        "refresh",
        "refresh-adapter",
        "flows.refresh_adapter:refresh_adapter",
        gate="adapter",
        registry_kind="adapter",
        artifact_path="adapter",
        timeout_hours=24.0,  # a hyperparameter search trains several adapters
    ),
    Stage(
        "feedback",
        "learn-from-feedback",
        "flows.learn_from_feedback:learn_from_feedback",
        gate="feedback",
        registry_kind="adapter",
        artifact_path="adapter",
    ),
    Stage("check", "check", "flows.check:check_stack", scheduled=False, timeout_hours=0.25),
)
"""Every stage, in the order the demo cycle runs them."""

STAGE_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
SCHEDULED: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.scheduled)
"""The stages a specialist schedules (the keys of `schedules:`), which are also the demo cycle."""
GATE_KINDS: tuple[str, ...] = tuple(stage.gate for stage in STAGES if stage.gate)
"""The keys of a specialist's `gates:`."""
RETRIEVAL_GATE_KINDS: tuple[str, ...] = tuple(stage.gate for stage in STAGES if stage.gate and stage.judges_retrieval)
"""The gate kinds whose rules read retrieval metrics (`evaluation.retrieval_metrics`)."""
REGISTRY_KINDS: tuple[str, ...] = tuple(dict.fromkeys(stage.registry_kind for stage in STAGES if stage.registry_kind))
"""The kinds of registered model a specialist has: `<project>.<specialist>.<kind>`."""


def stage(name: str) -> Stage:
    """The stage called `name`.

    Raises:
        KeyError: no such stage; the message lists the stages there are.
    """
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are: {', '.join(STAGE_BY_NAME)}") from None


def stage_of_gate(gate: str) -> Stage:
    """The stage whose candidates the `gate` rules judge."""
    return next(s for s in STAGES if s.gate == gate)
