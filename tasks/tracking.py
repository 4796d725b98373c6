"""Tasks that open and close a flow run's MLflow run (I/O: retried)."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run

from cadre.config import CadreConfig
from cadre.registry.runs import RunHandle, close_run, open_run, run_summary_markdown


@task(retries=3, retry_delay_seconds=[2, 5, 10], name="log-resolved-config")
def open_tracking_run(config: CadreConfig, specialist: str, flow: str, budget: str) -> RunHandle:
    """Create the MLflow run and log the resolved config, fingerprints and code version before any work."""
    return open_run(config, specialist, flow, budget, flow_run_id=flow_run.get_id())


@task(retries=3, retry_delay_seconds=[2, 5, 10], name="close-mlflow-run")
def close_tracking_run(handle: RunHandle, status: str = "FINISHED") -> None:
    """End the MLflow run and put what the flow run decided on its page in the Prefect UI (Artifacts tab)."""
    from prefect.artifacts import create_markdown_artifact

    close_run(handle, status)
    create_markdown_artifact(
        run_summary_markdown(handle.tracking_uri, handle.run_id),
        key="cadre-summary",
        description="What this run decided, with links to its MLflow run and registry version",
    )
