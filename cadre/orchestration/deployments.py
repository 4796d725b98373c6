"""Prefect deployments of the team: one per specialist × flow, on the project's process work pool.

`deploy_all` is idempotent. A deployment is named `<flow>/<specialist>`; its schedule carries the
stable slug `<specialist>-<flow>` and keeps the `active` flag a user set in the UI (redeploying never
re-activates a paused schedule). Deployments of removed specialists or schedules are deleted. Every
deployment allows one run at a time (`concurrency_limit=1`). `run_now` triggers a deployment and
follows the run to its end, printing its state and the MLflow run it logged to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from cadre.config import CadreConfig
from cadre.config.budget import WALL_CAP_TAG
from cadre.evaluation.results import mlflow_metric_name
from cadre.orchestration import automations
from cadre.platform.env import apply_env
from cadre.platform.stack import worker_name
from cadre.registry.runs import find_run, run_verdict, skipped_summary, ui_url
from cadre.stages import RETRIEVAL_GATE_KINDS, STAGE_BY_NAME, STAGES

TAG_MANAGED = "cadre"


@dataclass(frozen=True)
class DeploymentSpec:
    """What one deployment should look like."""

    flow_kind: str
    specialist: str
    cron: str | None
    timezone: str
    active: bool

    @property
    def slug(self) -> str:
        return f"{self.specialist}-{self.flow_kind}"


def desired_deployments(config: CadreConfig) -> list[DeploymentSpec]:
    """Every specialist × stage (`cadre.stages.STAGES`): scheduled ones with their cron, `check` unscheduled."""
    specs = []
    for specialist in config.specialists:
        for stage in STAGES:
            schedule = getattr(specialist.schedules, stage.name) if stage.scheduled else None
            specs.append(
                DeploymentSpec(
                    flow_kind=stage.name,
                    specialist=specialist.name,
                    cron=schedule.cron if schedule else None,
                    timezone=schedule.timezone if schedule else "UTC",
                    active=schedule.active if schedule else False,
                )
            )
    return specs


def _ensure_work_pool(client, name: str, max_concurrent_runs: int | None = None) -> None:
    """The process work pool exists, with `project.prefect.max_concurrent_runs` as its concurrency limit."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=max_concurrent_runs))
            return
        except ObjectAlreadyExists:
            pool = client.read_work_pool(name)
    if pool.concurrency_limit != max_concurrent_runs:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=max_concurrent_runs))


def deploy_all(config: CadreConfig, console: Console | None = None, paused: bool = False) -> list[str]:
    """Create or update every deployment of the team; delete the ones no longer declared. Returns their names.

    An active schedule runs its flow at its next cron time. With `paused`, every schedule is created (or set)
    paused; `cadre run` still runs any flow, and the Prefect UI resumes a schedule.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound
    from prefect.schedules import Schedule

    console = console or Console(stderr=True)
    apply_env(config)
    project_tag = automations.project_tag(config)
    names: list[str] = []
    active: list[str] = []  # deployments whose schedule runs
    with get_client(sync_client=True) as client:
        _ensure_work_pool(client, config.project.prefect.work_pool, config.project.prefect.max_concurrent_runs)
        lost_runs = automations.ensure_lost_runs_automation(client, config)
        for spec in desired_deployments(config):
            flow = STAGE_BY_NAME[spec.flow_kind].flow_object()
            full_name = f"{flow.name}/{spec.specialist}"
            schedules = []
            if spec.cron:
                schedule_active = spec.active and not paused
                try:
                    existing = client.read_deployment_by_name(full_name)
                    for schedule in existing.schedules:
                        if schedule.slug == spec.slug:
                            schedule_active = schedule.active and not paused  # the UI's pause wins over the file
                except ObjectNotFound:
                    pass
                schedules = [Schedule(cron=spec.cron, timezone=spec.timezone, active=schedule_active, slug=spec.slug)]
            deployment = flow.to_deployment(
                name=spec.specialist,
                schedules=schedules,
                concurrency_limit=1,
                parameters={"specialist": spec.specialist, "config_path": str(config.file)},
                tags=[TAG_MANAGED, project_tag, f"specialist:{spec.specialist}", f"flow:{spec.flow_kind}"],
                description=f"{spec.flow_kind} for specialist {spec.specialist} (managed by `cadre deploy` from {config.file.name})",
                work_pool_name=config.project.prefect.work_pool,
                entrypoint_type=EntrypointType.MODULE_PATH,
                triggers=[automations.index_promoted_trigger(config, spec.specialist)]
                if spec.flow_kind == "optimize"
                else [],
            )
            deployment.apply()
            names.append(full_name)
            if schedules and schedules[0].active:
                active.append(full_name)
            when = (
                f"cron '{spec.cron}' {spec.timezone}" + ("" if schedules and schedules[0].active else " (paused)")
                if spec.cron
                else "on demand"
            )
            console.print(f"[green]✓[/green] {full_name}: {when}")
        names.append(_deploy_crashed_runs_flow(config, project_tag))
        console.print(
            f"[green]✓[/green] {names[-1]}: when a run crashes (a run silent for "
            f"{config.project.prefect.heartbeat_timeout_s} s is crashed by the automation "
            f"'{lost_runs}')"
        )
        wanted = set(names)
        managed = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG_MANAGED, project_tag]))
        )
        for deployment in managed:
            flow_name = client.read_flow(deployment.flow_id).name
            if f"{flow_name}/{deployment.name}" not in wanted:
                client.delete_deployment(deployment.id)
                console.print(
                    f"[yellow]−[/yellow] removed {flow_name}/{deployment.name} (no longer in {config.file.name})"
                )
    console.print(
        f"{len(names)} deployment(s) on work pool '{config.project.prefect.work_pool}'. "
        f"Prefect UI: {config.project.prefect.ui}/deployments"
    )
    if active:
        console.print(
            f"{len(active)} schedule(s) are active: the worker starts each flow at its next cron time, on the full "
            "budget. `cadre deploy --paused` deploys them paused; resume one in the Prefect UI."
        )
    else:
        console.print("every schedule is paused: nothing runs until `cadre run` or a schedule is resumed in the UI")
    return names


def _deploy_crashed_runs_flow(config: CadreConfig, project_tag: str) -> str:
    """The project's `end-crashed-tracking` deployment, run by any worker when a run of the project crashes."""
    from prefect.deployments.runner import EntrypointType

    from flows.crashed_runs import end_crashed_tracking

    end_crashed_tracking.to_deployment(
        name=config.project.name,
        parameters={"config_path": str(config.file)},
        tags=[TAG_MANAGED, project_tag, f"flow:{automations.CRASHED_FLOW}"],
        description="Ends the MLflow run of a flow run of the project that crashed where no worker saw it "
        "(triggered by its Crashed event; managed by `cadre deploy`)",
        work_pool_name=config.project.prefect.work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        triggers=[automations.crashed_runs_trigger(config)],
    ).apply()
    return f"{automations.CRASHED_FLOW}/{config.project.name}"


def _online_workers(client, pool: str) -> int:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    return len(
        client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
    )


LOST_CONTACT_S = 20.0
"""`cadre run` stops following a run after the Prefect server has not answered for this long."""


ORPHAN_PENDING_AFTER_S = 120.0
"""A run Pending this long without a live process was submitted by a worker that is gone."""


def crash_orphaned_runs(config: CadreConfig, console: Console | None = None) -> list[str]:
    """Mark Crashed the flow runs of the project's work pool whose process is gone; return their names.

    A run whose process died with the stack (`cadre down` mid-run, a reboot, `kill -9`) stays Running in
    Prefect for ever and keeps its deployment's only concurrency slot, so the next run of that flow would
    wait for ever (AwaitingConcurrencySlot). `cadre up` calls this: leaving Running releases the slot, and
    the flows resume or redo what did not finish when they are run again. Only runs submitted by the
    worker `cadre up` starts are judged, and one whose process is alive is left alone, so calling it while
    flows run is safe.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    console = console or Console(stderr=True)
    apply_env(config)
    crashed = []
    with get_client(sync_client=True) as client:
        for run in _unfinished_runs_of_our_worker(config, client):
            if _engine_alive(run.infrastructure_pid):
                continue
            since = run.state.timestamp if run.state else None
            if (
                run.state_type == StateType.PENDING
                and since is not None
                and time.time() - since.timestamp() < ORPHAN_PENDING_AFTER_S
            ):
                continue  # a worker may be starting it right now
            was = run.state.name if run.state else "?"
            client.set_flow_run_state(
                run.id,
                Crashed(
                    message=f"its process is gone (it was {was} when the stack stopped); "
                    "run it again: it resumes or redoes what did not finish"
                ),
                force=True,
            )
            crashed.append(run.name)
            console.print(
                f"[yellow]![/yellow] flow run {run.name} ({was}) had lost its process: marked Crashed, its slot released"
            )
        stale = _end_stale_tracking_runs(config, client)  # those just crashed included
    if stale:
        console.print(
            f"[yellow]![/yellow] {stale} MLflow run(s) of flow runs that ended without closing them (crashed, cancelled) "
            "marked KILLED"
        )
    return crashed


def _unfinished_runs_of_our_worker(config: CadreConfig, client) -> list:
    """The flow runs of the project's work pool submitted by the worker `cadre up` starts (Prefect labels each run
    with its worker's name) that have not ended: Pending, Running or Cancelling. A run of another worker (`cadre
    worker`, another machine) is not ours to judge."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    unfinished = FlowRunFilter(
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])
        )
    )
    pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[config.project.prefect.work_pool]))
    ours = worker_name(config)
    return [
        run
        for run in client.read_flow_runs(flow_run_filter=unfinished, work_pool_filter=pool)
        if (run.labels or {}).get("prefect.worker.name") == ours
    ]


STOP_GRACE_S = 20.0
"""How long `cadre down` gives a flow-run process to unwind after SIGTERM (its MLflow run ends KILLED) before SIGKILL."""

CANCEL_WINDOW_S = 10.0
"""How long `cadre down` lets the worker carry out a cancel itself (Prefect then records the run Cancelled)."""

STOPPED_BY_DOWN = "stopped by `cadre down`; run it again: it resumes or redoes what did not finish"


def end_flow_runs(
    config: CadreConfig,
    worker_pid: int | None,
    wait: bool = False,
    grace_s: float = STOP_GRACE_S,
    console: Console | None = None,
) -> list[str]:
    """End the flow runs the worker `cadre up` started, before `cadre down` stops the stack; return what it ended.

    The worker starts each flow run as a process in a session of its own, so stopping the worker alone leaves them
    running, orphaned. Where Prefect answers, each unfinished run of our worker is set Cancelling and the worker,
    given `CANCEL_WINDOW_S`, ends its process as a cancel from the UI would. What still runs then (the worker is
    gone, Prefect is down, the run ignores the cancel) gets SIGTERM, which a flow run turns into an exception that
    ends its MLflow run KILLED, and SIGKILL after `grace_s`. Runs left unfinished are then marked Cancelled and
    MLflow runs left RUNNING are ended KILLED, so the next `cadre up` finds nothing to crash.

    Args:
        config: the validated pipelines file.
        worker_pid: the worker `cadre up` started, if it runs: its children are the flow-run processes.
        wait: wait for the flow runs to finish instead (runs the worker picks up meanwhile included).
        grace_s: seconds between SIGTERM and SIGKILL.
        console: where to say what was ended.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    from cadre.platform.stack import StackError, child_pids, require_services, stop_processes

    console = console or Console(stderr=True)
    apply_env(config)

    def answers(service: str) -> bool:
        try:
            require_services(config, service)
        except StackError:
            return False
        return True

    client = get_client(sync_client=True) if answers("prefect") else None
    with client if client is not None else nullcontext():

        def current() -> tuple[dict[int, object], list]:
            """The live flow-run processes (pid → its run, None when no run records it) and the unfinished runs."""
            runs = _unfinished_runs_of_our_worker(config, client) if client else []
            processes: dict[int, object] = {}
            if worker_pid is not None:
                processes |= {pid: None for pid in child_pids(worker_pid) if _is_engine(pid)}
            for run in runs:
                if (pid := _local_engine_pid(run.infrastructure_pid)) is not None:
                    processes[pid] = run
            return processes, runs

        def starting(runs: list) -> list:
            """Runs our live worker has taken but not started yet: it will."""
            if worker_pid is None:
                return []
            return [
                run
                for run in runs
                if run.state_type == StateType.PENDING
                and run.state
                and time.time() - run.state.timestamp.timestamp() < ORPHAN_PENDING_AFTER_S
            ]

        processes, runs = current()
        if wait:
            shown: set[str] = set()
            while processes or starting(runs):
                names = {_run_label(client, run) if run else f"pid {pid}" for pid, run in processes.items()}
                names |= {_run_label(client, run) for run in starting(runs)}
                if names - shown:
                    console.print(f"waiting for {len(names)} flow run(s) to finish: {', '.join(sorted(names))} …")
                    shown |= names
                time.sleep(2.0)
                processes, runs = current()
            return []
        if not processes and not runs:
            return []

        for run in runs:
            if run.state_type != StateType.CANCELLING:
                client.set_flow_run_state(run.id, Cancelling(message=STOPPED_BY_DOWN), force=True)
        started = time.monotonic()
        if client is not None and worker_pid is not None:
            while time.monotonic() - started < CANCEL_WINDOW_S and any(_is_engine(pid) for pid in processes):
                time.sleep(0.2)
        cancelled = {pid: time.monotonic() - started for pid in processes if not _is_engine(pid)}
        stopped = stop_processes([pid for pid in processes if pid not in cancelled], grace_s)
        final: dict = {}
        for run in runs:  # the worker records a cancel it carried out; what it could not, we record
            state = client.read_flow_run(run.id).state
            if state is None or not state.is_final():
                client.set_flow_run_state(run.id, Cancelled(message=STOPPED_BY_DOWN), force=True)
                state = client.read_flow_run(run.id).state
            final[run.id] = state.name if state else "?"
        ended = []
        for pid, run in processes.items():
            if pid in cancelled:
                how = f"its process (pid {pid}) ended {cancelled[pid]:.1f} s after the cancel"
            elif stopped[pid] is not None:
                how = f"its process (pid {pid}) ended {stopped[pid]:.1f} s after SIGTERM"
            else:
                how = f"its process (pid {pid}) was still running {grace_s:.0f} s after SIGTERM: killed (SIGKILL)"
            ended.append(_run_label(client, run) if run else f"pid {pid}")
            console.print(f"[yellow]■[/yellow] flow run {ended[-1]}: {final[run.id] if run else 'ended'}; {how}")
        with_process = {run.id for run in processes.values() if run is not None}
        for run in runs:
            if run.id not in with_process:
                ended.append(_run_label(client, run))
                why = "before it started" if run.state_type == StateType.PENDING else "its process was already gone"
                console.print(f"[yellow]■[/yellow] flow run {ended[-1]}: {final[run.id]} {why}")
        if client is None:
            if processes:
                console.print("  Prefect is not answering: the next `cadre up` marks these flow runs Crashed")
            return ended
        stale = _end_stale_tracking_runs(config, client) if answers("mlflow") else 0
    if stale:
        console.print(f"[yellow]■[/yellow] {stale} MLflow run(s) of the stopped flow runs marked KILLED")
    return ended


def _run_label(client, run) -> str:
    """`name (flow/specialist, State)` for a flow run, as `cadre down` reports it."""
    flow = client.read_flow(run.flow_id).name if client else "?"
    specialist = (run.parameters or {}).get("specialist", "?")
    return f"{run.name} ({flow}/{specialist}, {run.state.name if run.state else '?'})"


def _end_stale_tracking_runs(config: CadreConfig, client) -> int:
    """End as KILLED the MLflow runs still RUNNING whose Prefect flow run has ended: a flow killed by a signal (the
    worker marks it Crashed) or cancelled never reaches its own `close` step. Returns how many were ended."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import ObjectNotFound

    from cadre.registry.runs import TAG_FLOW_RUN

    try:
        mlflow = MlflowClient(config.project.mlflow.uri)
        experiments = [e.experiment_id for e in mlflow.search_experiments()]
        running = (
            mlflow.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=500)
            if experiments
            else []
        )
    except (MlflowException, OSError):
        return 0
    ended = 0
    for run in running:
        flow_run_id = run.data.tags.get(TAG_FLOW_RUN)
        if not flow_run_id:
            continue
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:
            state = None
        if state is None or state.is_final():
            ended += _end_as_killed(config.project.mlflow.uri, run)
    return ended


def _end_as_killed(tracking_uri: str, run) -> bool:
    """End a flow run's MLflow run as KILLED if it is still RUNNING (its flow never reached its close step)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if run.info.status != "RUNNING":
        return False
    try:
        MlflowClient(tracking_uri).set_terminated(run.info.run_id, "KILLED")
    except (MlflowException, OSError):
        return False  # MLflow unreachable: the run stays as it was; nothing else depends on it
    return True


def _engine_alive(infrastructure_pid: str | None) -> bool:
    """Whether the process a process worker recorded for a flow run (`pid`, or `host:pid`) is a live flow engine."""
    if infrastructure_pid and infrastructure_pid.rpartition(":")[0] not in ("", os.uname().nodename, "localhost"):
        return True  # another machine's run: not ours to judge
    return _local_engine_pid(infrastructure_pid) is not None


def _local_engine_pid(infrastructure_pid: str | None) -> int | None:
    """The pid a process worker recorded for a flow run (`pid`, or `host:pid`), if it is a live flow engine here."""
    if not infrastructure_pid:
        return None
    host, _, pid = infrastructure_pid.rpartition(":")
    if host and host not in (os.uname().nodename, "localhost"):
        return None
    try:
        return int(pid) if _is_engine(int(pid)) else None
    except ValueError:
        return None


def _is_engine(pid: int) -> bool:
    """Whether a live process runs Prefect (a flow run's `python -m prefect.engine`)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"prefect" in command


def print_schedules(config: CadreConfig, console: Console) -> None:
    """Print each deployment of the team: its schedule (paused or not), its next run and how its last run ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from rich.table import Table

    apply_env(config)
    table = Table(title=f"Schedules and runs in {config.project.prefect.ui}/deployments", title_justify="left")
    for column in ("deployment", "schedule", "next run", "last run", "ended"):
        table.add_column(column)
    colours = {"Completed": "green", "Failed": "red", "Crashed": "red", "Cancelled": "yellow", "Running": "cyan"}
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(
                tags=DeploymentFilterTags(all_=[TAG_MANAGED, automations.project_tag(config)])
            )
        )
        flow_names = {d.flow_id: client.read_flow(d.flow_id).name for d in deployments}
        for deployment in sorted(deployments, key=lambda d: (d.name, flow_names[d.flow_id])):
            mine = FlowRunFilterDeploymentId(any_=[deployment.id])
            upcoming = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=mine,
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=1,
            )
            last = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=mine,
                    state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])),
                ),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            schedule = "on demand"
            if deployment.schedules:
                first = deployment.schedules[0]
                cron = getattr(first.schedule, "cron", None) or str(first.schedule)
                schedule = f"{cron} {getattr(first.schedule, 'timezone', '') or ''}".strip() + (
                    "" if first.active else " [yellow](paused)[/yellow]"
                )
            next_run = _moment(upcoming[0].expected_start_time) if upcoming else "—"
            if last:
                state = last[0].state_name or "?"
                colour = colours.get(state, "")
                last_run = f"{last[0].name}: [{colour}]{state}[/{colour}]" if colour else f"{last[0].name}: {state}"
                ended = _moment(last[0].end_time or last[0].start_time)
            else:
                last_run, ended = "[dim]never ran[/dim]", ""
            table.add_row(f"{flow_names[deployment.flow_id]}/{deployment.name}", schedule, next_run, last_run, ended)
    console.print(table)


def _moment(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "—"


def _queued_or_running(client, deployment_id) -> list:
    """The deployment's flow runs that hold or wait for its one concurrency slot, oldest first: Running, Pending,
    Cancelling, and Scheduled ones due now (Late, AwaitingConcurrencySlot), not the cron's future runs."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING, StateType.SCHEDULED]
                )
            ),
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
    now = time.time()
    return [
        run
        for run in runs
        if run.state_type != StateType.SCHEDULED
        or (run.expected_start_time is not None and run.expected_start_time.timestamp() <= now + 5)
    ]


def _who_started(run) -> str:
    tags = set(run.tags or [])
    if run.created_by is not None and str(run.created_by.type).upper().endswith("AUTOMATION"):
        return f"started by the Prefect automation '{run.created_by.display_value}'"
    if "trigger:cli" in tags:
        return "started by `cadre run`"
    if run.auto_scheduled:
        return "started by its schedule"
    return "started from the Prefect UI or API"


class CancelError(RuntimeError):
    """What `cadre cancel` was asked to cancel does not exist or is not the specialist's."""


def cancel_runs(config: CadreConfig, target: str, specialist: str, console: Console | None = None) -> list[str]:
    """Cancel a flow run of the specialist (its name or id), or every queued or running run of one of its flows
    (`target` a stage name, `cadre.stages`); return the names of the runs cancelled.

    A run with a process is set Cancelling and the worker ends its process (Prefect then records it Cancelled, as
    the UI's Cancel does); one that has not started is set Cancelled. Its MLflow run, if left RUNNING, ends KILLED.

    Raises:
        CancelError: no such run or flow, or the run is not one of the specialist's.
    """
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling

    console = console or Console(stderr=True)
    apply_env(config)
    message = "cancelled with `cadre cancel`; run it again: it resumes or redoes what did not finish"
    with get_client(sync_client=True) as client:
        if target in STAGE_BY_NAME:
            name = f"{STAGE_BY_NAME[target].flow}/{specialist}"
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise CancelError(f"deployment {name} does not exist (run `cadre deploy`)") from None
            runs = _queued_or_running(client, deployment.id)
            if not runs:
                console.print(f"{name} has no queued or running flow run; nothing to cancel")
                return []
        else:
            try:
                runs = [client.read_flow_run(uuid.UUID(target))]
            except (ValueError, ObjectNotFound):
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[target])))
            if not runs:
                raise CancelError(
                    f"no flow run named {target!r}, and no flow of that name (the flows: {', '.join(STAGE_BY_NAME)})"
                )
            if any((run.parameters or {}).get("specialist") != specialist for run in runs):
                raise CancelError(f"flow run {target} is not a run of specialist {specialist!r}; nothing was cancelled")
        cancelled = []
        for run in runs:
            label = _run_label(client, run)
            if run.state and run.state.is_final():
                console.print(f"flow run {label} has already ended; nothing to cancel")
                continue
            if run.state_type in (StateType.SCHEDULED, StateType.PENDING) and not run.infrastructure_pid:
                client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
            elif run.state_type != StateType.CANCELLING:
                client.set_flow_run_state(run.id, Cancelling(message=message), force=True)
            state = _wait_final(client, run.id, CANCEL_WINDOW_S)
            if state is None or not state.is_final():
                # No worker carried the cancel out (it is not running): nothing else will.
                client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
                state = client.read_flow_run(run.id).state
            cancelled.append(run.name)
            console.print(f"[yellow]■[/yellow] cancelled flow run {label}: now {state.name if state else '?'}")
        if cancelled and _end_stale_tracking_runs(config, client):
            console.print("  its MLflow run was left RUNNING: marked KILLED")
    return cancelled


def _wait_final(client, flow_run_id, timeout_s: float):
    """The run's state once it is final, or its state after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.read_flow_run(flow_run_id).state
        if (state is not None and state.is_final()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def run_now(
    config: CadreConfig,
    flow_kind: str,
    specialist: str,
    budget: str = "full",
    console: Console | None = None,
    timeout_s: float | None = None,
    parameters: dict | None = None,
    follow_existing: bool = True,
    report: dict | None = None,
    env: dict[str, str] | None = None,
    on_started: Callable[[str], None] | None = None,
) -> bool:
    """Trigger `flow_kind` for a specialist through its deployment, follow it to the end, print a summary.

    A deployment runs one flow run at a time. With `follow_existing`, when a run of the same deployment and budget
    is already queued or running (a promoted re-index queues an optimize), that run answers the request: it is
    followed instead of queuing a second one that would wait for its slot and judge the same thing again. When a
    new run must wait (another budget, or `follow_existing=False`), it says for which run.

    Args:
        report: filled with what a script needs (`cadre run --json`): the flow run (id, name, URL, final state and
            message), the MLflow run id, its verdict and key figures.
        env: environment variables of a new flow run's process (on top of the worker's), e.g. its CPU threads.
        on_started: told the flow run's URL in the Prefect UI as soon as it is known.

    Returns:
        True when the flow run ended COMPLETED.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    console = console or Console(stderr=True)
    apply_env(config)
    if flow_kind not in STAGE_BY_NAME:
        console.print(f"[red]no flow {flow_kind!r}; the flows are: {', '.join(STAGE_BY_NAME)}[/red]")
        return False
    name = f"{STAGE_BY_NAME[flow_kind].flow}/{specialist}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            console.print(f"deployment {name} does not exist yet; deploying the team first")
            deploy_all(config, console)
            deployment = client.read_deployment_by_name(name)
        if _online_workers(client, config.project.prefect.work_pool) == 0:
            console.print(
                f"[red]no worker is polling work pool '{config.project.prefect.work_pool}': "
                "start the stack with `cadre up` (or run `cadre worker`) and try again[/red]"
            )
            return False
        busy = _queued_or_running(client, deployment.id)
        wanted = {"budget": budget, **(parameters or {})}
        answering = next(
            (
                run
                for run in busy
                if follow_existing
                and all(
                    (run.parameters or {}).get(k, "full" if k == "budget" else None) == v for k, v in wanted.items()
                )
            ),
            None,
        )
        if answering is not None:
            flow_run = answering
            console.print(
                f"{name} already has flow run [bold]{flow_run.name}[/bold] ({flow_run.state_name}, {budget}, "
                f"{_who_started(flow_run)}); it answers this request, so it is followed instead of queuing a second "
                "run (`--new` queues another anyway)"
            )
        else:
            flow_run = None
    if flow_run is None:
        flow_run = run_deployment(
            name,
            parameters=wanted,
            timeout=0,
            as_subflow=False,
            tags=[f"budget:{budget}", "trigger:cli"],
            job_variables={"env": env} if env else None,
        )
        if busy:
            ahead = busy[0]
            console.print(
                f"[yellow]{name} runs one flow run at a time: this one waits (AwaitingConcurrencySlot) until flow run "
                f"{ahead.name} ({ahead.state_name}, budget {(ahead.parameters or {}).get('budget', '?')}, "
                f"{_who_started(ahead)}) ends[/yellow]"
            )
    url = f"{config.project.prefect.ui}/runs/flow-run/{flow_run.id}"
    console.print(f"▶ {name} ({budget}) — flow run [bold]{flow_run.name}[/bold]: {url}")
    if on_started is not None:
        on_started(url)
    started = time.monotonic()
    try:
        state = _follow(console, name, flow_run.id, url, config.project.prefect.api, timeout_s)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]stopped following {flow_run.name}; it goes on in the worker: {url}[/yellow]\n"
            "  to stop it, press Cancel on that page. A cancelled or killed run can simply be run again:\n"
            "  it resumes or redoes what did not finish."
        )
        raise
    if report is not None:
        report.update(
            flow=name,
            specialist=specialist,
            budget=budget,
            flow_run_id=str(flow_run.id),
            flow_run=flow_run.name,
            url=url,
            state=state.name if state else "timed out",
            message=state.message if state else None,
            completed=bool(state and state.is_completed()),
        )
    if state is None:
        return False
    completed = state.is_completed()
    colour = "green" if completed else "red"
    console.print(
        f"[{colour}]{name} {state.name}[/{colour}] in {time.monotonic() - started:.1f}s"
        + ("" if completed else f": {state.message or ''}")
    )
    mlflow_run = find_run(config.project.mlflow.uri, str(flow_run.id))
    if mlflow_run is not None and (state.is_crashed() or state.is_cancelled()):
        _end_as_killed(config.project.mlflow.uri, mlflow_run)
    if mlflow_run is not None:
        console.print(
            f"  MLflow run: {ui_url(config.project.mlflow.uri, f'experiments/{mlflow_run.info.experiment_id}/runs/{mlflow_run.info.run_id}')}"
        )
        verdict = run_verdict(mlflow_run.data.tags)
        if verdict:
            console.print(f"  {verdict}")
        if mlflow_run.data.tags.get(WALL_CAP_TAG):
            console.print(f"  [yellow]{mlflow_run.data.tags[WALL_CAP_TAG]}[/yellow]", highlight=False)
        skipped = skipped_summary(mlflow_run.data.metrics)
        if skipped:
            console.print(f"  [yellow]{skipped}[/yellow]")
        figures = key_metrics(config, specialist, flow_kind, mlflow_run.data.metrics)
        print_figures(console, figures)
        if report is not None:
            report.update(mlflow_run_id=mlflow_run.info.run_id, verdict=verdict or None, figures=figures)
    return completed


_ROLES = ("candidate", "champion", "baseline")


def print_figures(console: Console, metrics: dict[str, float]) -> None:
    """Print a run's key metrics as one line per metric: candidate vs champion (and baseline) side by side."""
    rows: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        role, _, metric = name.partition("_")
        if role in _ROLES and metric:
            rows.setdefault(metric, {})[role] = value
        else:
            rows.setdefault(name, {})["value"] = value
    if not rows:
        return
    console.print("  figures:")
    for metric, values in rows.items():
        cells = [f"{role} {values[role]:.4g}" for role in (*_ROLES, "value") if role in values]
        console.print(f"    {metric}: {' vs '.join(cells)}", highlight=False)


def _follow(console: Console, name: str, flow_run_id, url: str, api: str, timeout_s: float | None):
    """Print the flow run's state changes until it ends; its final state, or None after `timeout_s`."""
    from prefect.client.orchestration import get_client

    started = time.monotonic()
    last_state = None
    with get_client(sync_client=True) as client, console.status("waiting for the worker …") as status:
        lost_since = None
        while True:
            try:
                # A quick probe first: the client itself retries a refused connection for minutes.
                httpx.get(f"{api}/health", timeout=5).raise_for_status()
                state = client.read_flow_run(flow_run_id).state
                lost_since = None
            except (httpx.HTTPError, OSError) as error:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > LOST_CONTACT_S:
                    console.print(
                        f"[red]lost contact with the Prefect server ({type(error).__name__}); `cadre status` shows "
                        f"what is up. If the stack stopped, the run stopped with it: `cadre up` marks it Crashed "
                        f"and it can be run again. {url}[/red]"
                    )
                    return None
                time.sleep(2.0)
                continue
            if state and state.name != last_state:
                last_state = state.name
                console.print(f"  {time.monotonic() - started:6.1f}s  {state.name}")
            status.update(f"{name}: {state.name if state else 'pending'} ({time.monotonic() - started:.0f}s)")
            if state and state.is_final():
                return state
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                console.print(f"[red]gave up waiting after {timeout_s:.0f}s; the run continues in Prefect: {url}[/red]")
                return None
            time.sleep(1.0)


def key_metrics(
    config: CadreConfig, specialist: str, flow_kind: str, metrics: dict[str, float], most: int = 12
) -> dict[str, float]:
    """The numbers a person reads first: the metrics the flow's gates judge (candidate and champion); without gate
    rules, the specialist's answer metrics (retrieval metrics for a re-index); else the first few."""
    settings = config.specialist(specialist)
    gate = STAGE_BY_NAME[flow_kind].gate if flow_kind in STAGE_BY_NAME else None
    rules = getattr(settings.gates, gate) if gate else []
    retrieval = gate in RETRIEVAL_GATE_KINDS
    fallback = settings.evaluation.retrieval_metrics if retrieval else settings.evaluation.answer_metrics
    judged = [rule.metric for rule in rules] or (fallback if gate else [])
    wanted = list(dict.fromkeys(mlflow_metric_name(metric) for metric in judged))  # as MLflow stores them
    picked = {
        name: metrics[name]
        for metric in wanted
        for name in (f"candidate_{metric}", f"champion_{metric}", f"baseline_{metric}", metric)
        if name in metrics
    }
    return dict(list(picked.items())[:most]) if picked else dict(sorted(metrics.items())[:most])


def run_worker(config: CadreConfig) -> int:
    """Run a Prefect process worker on the project's pool in the foreground (what `cadre up` starts in the background)."""
    apply_env(config)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    command = [prefect, "worker", "start", "--pool", config.project.prefect.work_pool, "--type", "process"]
    return subprocess.call(command, env=os.environ.copy(), cwd=config.root)
