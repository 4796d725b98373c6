"""A flow run's MLflow run: opened first, closed last, however the flow ends.

Every flow wraps its steps in `tracked_run`, which opens the run (logging the resolved config before any work)
and ends it FINISHED when the block completes (an early `return` included), FAILED when it raises, and KILLED
when the process is told to stop. Opening and closing are I/O tasks and are retried.

Stopping: the block runs inside `cadre.platform.signals.terminate_on_sigterm()`, so SIGTERM (a cancel from the
UI, a worker shutting down, `cadre down`) raises: Prefect's `TerminationSignal` inside a flow run (its engine then
marks the flow run Cancelled or Crashed), `Terminated` outside one. Either, and Ctrl-C, end the MLflow run KILLED.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from cadre.config import CadreConfig
from cadre.config.budget import RunBudget
from cadre.orchestration.run_page import publish_summary
from cadre.platform.signals import Terminated, terminate_on_sigterm
from cadre.registry.runs import RunHandle, close_run, dspy_traces, log_dataset, open_run, system_metrics
from cadre.stages import stage as stage_named

STOPPED = (Terminated, TerminationSignal, KeyboardInterrupt)
"""What a process told to stop raises: its MLflow run ends KILLED."""


@task(retries=3, retry_delay_seconds=[2, 5, 10], name="log-resolved-config")
def open_tracking_run(config: CadreConfig, specialist: str, flow: str, budget: RunBudget) -> RunHandle:
    """Create the MLflow run and log the resolved config, fingerprints and code version before any work."""
    return open_run(config, specialist, flow, budget, flow_run_id=flow_run.get_id())


@task(retries=3, retry_delay_seconds=[2, 5, 10], name="close-mlflow-run")
def close_tracking_run(handle: RunHandle, status: str = "FINISHED") -> None:
    """End the MLflow run (its verdict goes on the run first: the `verdict` tag and the run name)."""
    close_run(handle, status)


@task(retries=3, retry_delay_seconds=[2, 5, 10], name="log-datasets")
def log_case_splits(handle: RunHandle, suite_dir: str, cases: dict[str, list[dict]]) -> None:
    """Each case split the run used as an MLflow dataset input, with its rows and fingerprint."""
    contexts = {"train": "training", "dev": "validation", "test": "testing"}
    for split, rows in cases.items():
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        source = next(iter(sorted(Path(suite_dir).glob(f"{split}.*"))), Path(suite_dir))
        log_dataset(handle, split, contexts.get(split, split), digest, str(source), rows)


def _publish_summary(handle: RunHandle) -> None:
    # In the flow run's own context (not a task's), so the flow run's Artifacts tab lists it.
    with suppress(Exception):
        publish_summary(handle)


@contextmanager
def tracked_run(config: CadreConfig, specialist: str, stage: str, budget: RunBudget) -> Iterator[RunHandle]:
    """Open the flow run's MLflow run for the block; end it FINISHED, FAILED or KILLED as the block ends.

    Args:
        config: the validated pipelines file.
        specialist: the specialist the flow works for.
        stage: the flow's stage (`cadre.stages`), recorded as the run's `cadre.flow` tag.
        budget: `smoke` or `full`.
    """
    with terminate_on_sigterm():
        handle = open_tracking_run(config, specialist, stage, budget)
        try:
            with system_metrics(handle, stage), dspy_traces(handle, stage):
                yield handle
        except STOPPED:
            # Not through a task: the process is going away, and its flow run may be cancelling already. If
            # MLflow does not answer, `cadre run` and `cadre up` end the run KILLED later.
            with suppress(Exception):
                close_run(handle, "KILLED")
            raise
        except BaseException:
            close_tracking_run(handle, "FAILED")
            _publish_summary(handle)
            raise
    close_tracking_run(handle)
    _publish_summary(handle)


def end_tracking_run(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook (`on_crashed`, `on_cancellation`): end the flow run's MLflow run KILLED if it is still RUNNING.

    A flow run killed by a signal never reaches `tracked_run`'s close. Prefect runs this hook where the run was
    watched: the worker that saw its process die (on any machine) or the process told to cancel. When no one saw
    it die (its machine or its worker went with it), the heartbeat automation marks it Crashed and the
    `end-crashed-tracking` flow ends its MLflow run instead (`cadre.orchestration.automations`).
    """
    from cadre.config import load_config

    config = load_config(flow_run.parameters["config_path"])
    end_mlflow_runs(config, str(flow_run.id), flow_run.name, f"Prefect {state.name} hook")


def end_mlflow_runs(config: CadreConfig, flow_run_id: str, flow_run_name: str, ended_by: str) -> list[str]:
    """End KILLED the MLflow runs of a flow run that are still RUNNING; return their ids.

    The runs are found by their `cadre.prefect_flow_run_id` tag on the project's MLflow server (`config`, the file the
    flow run's `config_path` parameter names). Each gets a `cadre.ended_by` tag saying what ended it.
    """
    from mlflow import MlflowClient

    from cadre.registry.runs import TAG_FLOW_RUN

    client = MlflowClient(config.project.mlflow.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    found = client.search_runs(
        experiments,
        filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}' and attributes.status = 'RUNNING'",
        max_results=10,
    )
    for run in found:
        client.set_tag(run.info.run_id, "cadre.ended_by", ended_by)
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"MLflow run {run.info.run_id} of flow run {flow_run_name} ended KILLED ({ended_by})")
    return [run.info.run_id for run in found]


def stage_flow(name: str) -> Callable[[Callable[..., Any]], Any]:
    """The `@flow` of stage `name`: its Prefect name, its timeout, and `end_tracking_run` on crash and cancel."""
    spec = stage_named(name)
    return flow(
        name=spec.flow,
        log_prints=True,
        timeout_seconds=spec.timeout_hours * 3600,
        on_crashed=[end_tracking_run],
        on_cancellation=[end_tracking_run],
    )
