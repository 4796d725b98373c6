"""The `end-crashed-tracking` flow: the MLflow side of a flow run that crashed where no one saw it.

A flow run's own `on_crashed` hook ends its MLflow run when its worker sees the process die. When the machine or
the worker dies with it, nobody runs that hook: Prefect's heartbeat automation marks the run Crashed, and its
`prefect.flow-run.Crashed` event runs this flow (a deployment trigger, set up by `cadre deploy`) on any worker
still alive, which ends the MLflow run KILLED. See `cadre.orchestration.automations`.
"""

from __future__ import annotations

from prefect import flow

from cadre.config import load_config
from cadre.platform.env import apply_env
from tasks.tracking import end_mlflow_runs

FLOW_RUN_RESOURCE = "prefect.flow-run."


@flow(name="end-crashed-tracking", log_prints=True, timeout_seconds=600)
def end_crashed_tracking(crashed: str, config_path: str, state: str = "Crashed") -> list[str]:
    """End KILLED the MLflow runs still RUNNING of flow run `crashed` (its id, or its event resource id
    `prefect.flow-run.<id>`); return their ids."""
    from prefect.client.orchestration import get_client

    config = load_config(config_path)
    apply_env(config)
    flow_run_id = crashed.removeprefix(FLOW_RUN_RESOURCE)
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id).name
    ended = end_mlflow_runs(config, flow_run_id, name, f"Prefect automation: flow run {state}")
    if not ended:
        print(f"flow run {name} ({state}) left no MLflow run RUNNING")
    return ended
