"""What Prefect's own event machinery does for the team; `cadre deploy` sets it up, and the Prefect UI shows it
(Automations, and each event in the Event Feed).

- **Lost flow runs.** Every flow run sends a heartbeat event every `FLOW_HEARTBEAT_S` seconds
  (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, set by `cadre.platform.env.cadre_env` for every process Cadre starts). An
  automation marks a run of the project Crashed when its heartbeat has been silent for
  `project.prefect.heartbeat_timeout_s`: its machine died, or its worker was killed with it, so no worker saw the
  process end. This works for workers on any machine; `cadre up`'s `/proc` sweep only sees this one.
- **The MLflow side of a crash.** Prefect does not know MLflow. A crashed run's `on_crashed` hook ends its MLflow
  run where a worker saw it die; otherwise the `prefect.flow-run.Crashed` event triggers the project's
  `end-crashed-tracking` deployment (`flows/crashed_runs.py`), which any live worker runs.
- **A promoted index starts optimize.** The re-index and embedder flows emit `INDEX_PROMOTED` for the specialist
  when a new index version goes live; the specialist's optimize deployment has a trigger on it, so the prompts are
  re-optimized against the new index, on the budget of the run that promoted it.
"""

from __future__ import annotations

from typing import Any

from cadre.config import CadreConfig
from cadre.platform.env import FLOW_HEARTBEAT_S

INDEX_PROMOTED = "cadre.index.promoted"
"""Event a flow emits when it makes a new index version of a specialist live."""

CRASHED_FLOW = "end-crashed-tracking"

_FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def project_tag(config: CadreConfig) -> str:
    """The tag on every deployment of the project (and so on each of its flow runs)."""
    return f"project:{config.project.name}"


def specialist_resource(config: CadreConfig, specialist: str) -> str:
    """The Prefect event resource id of a specialist: what `INDEX_PROMOTED` is about."""
    return f"cadre.specialist.{config.project.name}.{specialist}"


def _runs_of_the_project(config: CadreConfig) -> dict[str, Any]:
    from prefect.events.schemas.events import ResourceSpecification

    return {
        "match": ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        "match_related": ResourceSpecification(
            {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{project_tag(config)}"}
        ),
    }


def lost_runs_automation(config: CadreConfig):
    """The automation that marks Crashed a run of the project whose heartbeat has stopped."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    silent = config.project.prefect.heartbeat_timeout_s
    return AutomationCore(
        name=f"{config.project.name}: crash flow runs whose heartbeat stopped",
        description=(
            f"A flow run of Cadre project {config.project.name} sends a heartbeat every {FLOW_HEARTBEAT_S} s; silent for "
            f"{silent} s, its machine or its worker died with it, and it is marked Crashed (managed by `cadre deploy`)."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in _FINAL_EVENTS)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent),
            **_runs_of_the_project(config),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent} s: its process, worker or machine is gone",
            )
        ],
    )


def crashed_runs_trigger(config: CadreConfig):
    """The trigger of the project's `end-crashed-tracking` deployment: any run of the project entering Crashed."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{config.project.name}: end the MLflow run of a crashed flow run",
        description="Prefect does not know MLflow: when a flow run of the project crashes, the project's "
        "end-crashed-tracking flow ends its MLflow run KILLED, on any live worker (managed by `cadre deploy`).",
        expect={"prefect.flow-run.Crashed"},
        parameters={"crashed": "{{ event.resource.id }}", "config_path": str(config.file)},
        **_runs_of_the_project(config),
    )


def index_promoted_trigger(config: CadreConfig, specialist: str):
    """The trigger of a specialist's optimize deployment: its index was promoted."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import ResourceSpecification

    return DeploymentEventTrigger(
        name=f"{config.project.name}/{specialist}: a promoted index starts optimize",
        description=f"When a re-index or an embedder run makes a new index version of {specialist} live, it emits "
        f"{INDEX_PROMOTED}; this re-optimizes the prompts against it, on that run's budget (managed by `cadre deploy`).",
        expect={INDEX_PROMOTED},
        match=ResourceSpecification({"prefect.resource.id": specialist_resource(config, specialist)}),
        parameters={
            "specialist": specialist,
            "config_path": str(config.file),
            "budget": "{{ event.payload.budget }}",
        },
    )


def emit_index_promoted(config: CadreConfig, specialist: str, version: str, budget: str, reason: str) -> None:
    """Tell Prefect a specialist's index version `version` went live (its optimize deployment reacts)."""
    from prefect.events import emit_event

    emit_event(
        event=INDEX_PROMOTED,
        resource={
            "prefect.resource.id": specialist_resource(config, specialist),
            "prefect.resource.name": f"{config.project.name}/{specialist}",
        },
        payload={"version": version, "budget": budget, "reason": reason},
    )


def ensure_lost_runs_automation(client, config: CadreConfig) -> str:
    """Create the project's lost-runs automation, replacing one of the same name (settings may have changed); return
    its name."""
    wanted = lost_runs_automation(config)
    for existing in client.read_automations_by_name(wanted.name):
        client.delete_automation(existing.id)
    client.create_automation(wanted)
    return wanted.name
