"""Tasks that check the services a scheduled run depends on, from inside the worker's process."""

from __future__ import annotations

import time
import urllib.request

from mlflow import MlflowClient
from prefect import task

from cadre.registry.runs import RunHandle


@task(retries=2, retry_delay_seconds=3, name="probe-service")
def probe_service(name: str, url: str) -> float:
    """GET the service's health URL; returns the round-trip in milliseconds (raises when unreachable)."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        if response.status >= 300:
            raise RuntimeError(f"{name} answered {response.status} at {url}")
    return 1000 * (time.perf_counter() - started)


@task(retries=3, retry_delay_seconds=2, name="log-probe-metrics")
def log_probe_metrics(handle: RunHandle, latencies_ms: dict[str, float], step: int = 0) -> None:
    client = MlflowClient(handle.tracking_uri)
    for name, value in latencies_ms.items():
        client.log_metric(handle.run_id, f"probe_{name}_ms", value, step=step)
