"""The task every flow ends with: gates decide, the registry follows (see cadre/registry/promotion.py)."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run

from cadre.config import CadreConfig
from cadre.evaluation.results import EvaluationResult
from cadre.registry.promotion import (
    ARTIFACT_OF_GATE,
    PromotionOutcome,
    champion_version,
    gate_and_promote,
)
from cadre.registry.runs import RunHandle

ARTIFACT_DIR = {"index": "index", "program": "program", "adapter": "adapter"}


def flow_actor(outside_a_flow: str = "cadre") -> str:
    """Who a flow's registry events are recorded as: `prefect:<flow>/<flow run name>`, the same in every flow.

    Called outside a flow run (a benchmark, a test calling the task's function), `outside_a_flow`.
    """
    if flow_run.get_id() is None:
        return outside_a_flow
    return f"prefect:{flow_run.get_flow_name() or 'flow'}/{flow_run.get_name() or flow_run.get_id()}"


@task(name="gate-and-promote", retries=2, retry_delay_seconds=[5, 15])
def promote_through_gates(
    config: CadreConfig,
    specialist: str,
    gate_kind: str,
    handle: RunHandle,
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    lineage: dict[str, str],
    expected_champion: str | None = None,
) -> PromotionOutcome:
    """Decide the gates of `gate_kind`, register the candidate logged under the run's artifact folder, promote if passed.

    Retried: registration and promotion are idempotent (a re-run reuses the version it registered and
    does not record a decision twice).
    """
    artifact_kind = ARTIFACT_OF_GATE[gate_kind]
    if expected_champion is None:
        expected_champion = champion_version(config, specialist, artifact_kind)
    return gate_and_promote(
        config,
        specialist,
        gate_kind,
        handle,
        ARTIFACT_DIR[artifact_kind],
        candidate,
        champion,
        lineage,
        expected_champion=expected_champion,
        actor=flow_actor(),
    )
