"""The `check` flow: proves a scheduled run can reach every service and log to MLflow.

Run it with `cadre run check -s SPECIALIST`; the integration tests and `bench/overhead.py` use it.
"""

from __future__ import annotations

from prefect import flow

from cadre.config import load_config
from cadre.config.budget import RunBudget
from cadre.platform.env import apply_env
from cadre.stages import stage
from tasks.platform import log_probe_metrics, probe_service
from tasks.tracking import tracked_run


@flow(name=stage("check").flow, log_prints=True)
def check_stack(specialist: str, config_path: str, budget: RunBudget = "smoke") -> dict:
    """Log the resolved config, probe MLflow, Prefect and the LM endpoint, record the latencies."""
    config = load_config(config_path)
    apply_env(config)
    project = config.project
    targets = {
        "mlflow": f"{project.mlflow.uri}/health",
        "prefect": f"{project.prefect.api}/health",
        "lm": f"{project.lm.base_url}/models",
    }
    with tracked_run(config, specialist, "check", budget) as handle:
        latencies = {name: probe_service(name, url) for name, url in targets.items()}
        log_probe_metrics(handle, latencies)
    print(f"all services reachable: {', '.join(f'{k} {v:.0f} ms' for k, v in latencies.items())}")
    return {"mlflow_run_id": handle.run_id, **latencies}
