"""The `check` flow: proves a scheduled run can reach every service and log to MLflow.

Run it with `cadre run check -s SPECIALIST`; the integration tests and `bench/overhead.py` use it.
"""

from __future__ import annotations

import time

from cadre.config import load_config
from cadre.config.budget import RunBudget
from cadre.platform.env import apply_env
from tasks.platform import log_probe_metrics, probe_service
from tasks.tracking import stage_flow, tracked_run

WATCH_EVERY_S = 5.0


@stage_flow("check")
def check_stack(specialist: str, config_path: str, budget: RunBudget = "smoke", watch_s: float = 0.0) -> dict:
    """Log the resolved config, probe MLflow, Prefect and the LM endpoint, record the latencies.

    `watch_s` > 0 keeps probing every 5 s for that long (a soak check of the stack: each round's latencies are
    logged at their step, so the MLflow run charts them), and the figures returned are the last round's.
    """
    config = load_config(config_path)
    apply_env(config)
    project = config.project
    targets = {
        "mlflow": f"{project.mlflow.uri}/health",
        "prefect": f"{project.prefect.api}/health",
        "lm": f"{project.lm.base_url}/models",
    }
    with tracked_run(config, specialist, "check", budget) as handle:
        deadline = time.monotonic() + watch_s
        step = 0
        while True:
            latencies = {name: probe_service(name, url) for name, url in targets.items()}
            log_probe_metrics(handle, latencies, step)
            if time.monotonic() + WATCH_EVERY_S > deadline:
                break
            time.sleep(WATCH_EVERY_S)
            step += 1
    print(f"all services reachable: {', '.join(f'{k} {v:.0f} ms' for k, v in latencies.items())}")
    return {"mlflow_run_id": handle.run_id, **latencies}
