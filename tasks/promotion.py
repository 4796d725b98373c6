"""The task every flow that makes a candidate ends with: gates decide, the registry follows.

`promote_through_gates` is the Prefect face of `cadre.registry.promotion.gate_and_promote`, the one promotion
path (its docstring says what it does and guarantees). No flow or task moves a champion any other way.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from cadre.config import CadreConfig
from cadre.registry.promotion import Candidate, PromotionOutcome, champion_version, gate_and_promote
from cadre.registry.runs import RunHandle
from cadre.stages import stage


def flow_actor(outside_a_flow: str = "cadre") -> str:
    """Who a flow's registry events are recorded as: `prefect:<flow>/<flow run name>`, the same in every flow.

    Called outside a flow run (a benchmark, a test calling the task's function), `outside_a_flow`.
    """
    if flow_run.get_id() is None:
        return outside_a_flow
    return f"prefect:{flow_run.get_flow_name() or 'flow'}/{flow_run.get_name() or flow_run.get_id()}"


@task(name="find-champion-version", retries=3, retry_delay_seconds=[2, 5, 10])
def find_champion_version(config: CadreConfig, specialist: str, stage_name: str) -> str | None:
    """The version behind the `champion` alias of the stage's registry kind (None: no champion yet)."""
    return champion_version(config, specialist, stage(stage_name).registry_kind or "")


@task(name="gate-and-promote", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE)
def promote_through_gates(
    config: CadreConfig, specialist: str, handle: RunHandle, candidate: Candidate
) -> PromotionOutcome:
    """Decide the candidate's gates, register it from the run's artifact folder, promote it only if they pass.

    Retried: registration and promotion are idempotent (a re-run reuses the version it registered and
    does not record a decision twice).
    """
    actor = flow_actor(f"{stage(candidate.stage).flow}:{handle.run_id}")
    return gate_and_promote(config, specialist, handle, candidate, actor)
