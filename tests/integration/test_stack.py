"""The real local stack: `cadre up`, deploy, a run through Prefect, read back through Prefect's and
MLflow's own clients, `cadre down` leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from support import descendants, free_port, processes_under, run_cadre, write_stack_project

from cadre.stages import STAGES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    ports = {"mlflow": free_port(), "prefect": free_port(), "lm": free_port()}
    config = write_stack_project(root, ports, ["alpha", "beta"])
    up = run_cadre("up", config=config)
    assert up.returncode == 0, up.stdout + up.stderr
    yield config, ports
    down = run_cadre("down", config=config)
    assert down.returncode == 0, down.stderr
    leftovers = processes_under(root)
    for line in leftovers:  # never leave processes on the machine, even when failing
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not leftovers, "cadre down left processes behind:\n" + "\n".join(leftovers)


def test_up_is_idempotent_and_status_shows_urls(stack) -> None:
    config, ports = stack
    again = run_cadre("up", config=config)
    assert again.returncode == 0
    assert again.stderr.count("already running") == 4
    status = run_cadre("status", config=config)
    assert f"http://127.0.0.1:{ports['prefect']}" in status.stderr
    assert f"http://127.0.0.1:{ports['mlflow']}" in status.stderr


def test_deploy_run_and_read_back_through_prefect_and_mlflow(stack) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )

    config, ports = stack
    deploy = run_cadre("deploy", config=config)
    assert deploy.returncode == 0, deploy.stderr
    run = run_cadre("run", "check", "--specialist", "alpha", "--budget", "smoke", "--json", config=config)
    assert run.returncode == 0, run.stderr
    assert "Completed" in run.stderr
    [report] = json.loads(run.stdout)  # what a script reads: the same run, on stdout
    assert (report["flow"], report["state"], report["completed"]) == ("check/alpha", "Completed", True), report
    assert report["mlflow_run_id"] and report["url"].endswith(report["flow_run_id"]), report

    api = f"http://127.0.0.1:{ports['prefect']}/api"
    with SyncPrefectClient(api) as client:
        deployment = client.read_deployment_by_name("check/alpha")
        assert {"cadre", "specialist:alpha", "flow:check"} <= set(deployment.tags)
        assert deployment.work_pool_name == "stacktest-pool"
        assert client.read_work_pool("stacktest-pool").concurrency_limit == 3  # project.prefect.max_concurrent_runs
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
        )
        assert runs and runs[0].state.is_completed()
        flow_run_id = str(runs[0].id)
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
        )

        [summary] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id]))
        )
        assert summary.key == "cadre-summary" and "MLflow run: [" in summary.data, summary.data
        assert runs[0].parameters["budget"] == "smoke"
        assert len(
            client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["alpha", "beta"]))
            )
        ) == 2 * len(STAGES)

    mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
    experiment = mlflow.get_experiment_by_name("stacktest/alpha")
    found = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`cadre.prefect_flow_run_id` = '{flow_run_id}'"
    )
    assert len(found) == 1
    mlflow_run = found[0]
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["cadre.flow"] == "check"
    assert mlflow_run.data.params["program.instruction"] == "Answer."
    assert {"probe_mlflow_ms", "probe_prefect_ms", "probe_lm_ms"} <= set(mlflow_run.data.metrics)
    resolved = json.loads(
        Path(mlflow.download_artifacts(mlflow_run.info.run_id, "config/resolved_config.json")).read_text()
    )
    assert resolved["specialist"]["name"] == "alpha"

    status = run_cadre("status", config=config)
    row = next(line for line in status.stderr.splitlines() if "check/alpha" in line)
    assert "on demand" in row and "Completed" in row, status.stderr


def test_a_run_whose_process_died_is_crashed_by_up_and_frees_its_slot(stack) -> None:
    """`cadre down` mid-run, a reboot or `kill -9` leave a run Running for ever, holding its deployment's only
    concurrency slot: every later run of that flow would wait for ever. `cadre up` must clear it."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Pending, Running, Scheduled

    config, ports = stack
    assert run_cadre("deploy", config=config).returncode == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        deployment = client.read_deployment_by_name("check/alpha")
        limit = deployment.global_concurrency_limit.name
        # A run as a worker left it: it took the slot (Pending), ran (Running) in a process that is now gone.
        orphan = client.create_flow_run_from_deployment(
            deployment.id, state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=1))
        )
        client.update_flow_run(orphan.id, infrastructure_pid=str(dead.pid))
        client.update_flow_run_labels(orphan.id, {"prefect.worker.name": "cadre-stacktest"})  # what our worker labels
        assert client.set_flow_run_state(orphan.id, Pending()).status.value == "ACCEPT"
        client.set_flow_run_state(orphan.id, Running(), force=True)
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
        # The MLflow runs such flows leave RUNNING: the orphan's, and one of a run the worker already marked Crashed.
        from mlflow import MlflowClient
        from prefect.states import Crashed

        gone = client.create_flow_run_from_deployment(deployment.id, state=Crashed(message="killed by a signal"))
        mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
        experiment = mlflow.create_experiment(f"orphans-{orphan.id}")
        tracked = {
            str(run.id): mlflow.create_run(experiment, tags={"cadre.prefect_flow_run_id": str(run.id)}).info.run_id
            for run in (orphan, gone)
        }

        up = run_cadre("up", config=config)
        assert up.returncode == 0, up.stderr
        assert f"flow run {orphan.name} (Running) had lost its process: marked Crashed" in up.stderr
        assert client.read_flow_run(orphan.id).state.is_crashed()
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
        assert {mlflow.get_run(run_id).info.status for run_id in tracked.values()} == {"KILLED"}

    run = run_cadre("run", "check", "--specialist", "alpha", "--budget", "smoke", config=config, timeout=180)
    assert run.returncode == 0 and "Completed" in run.stderr, run.stderr
    again = run_cadre("up", config=config)
    assert "lost its process" not in again.stderr, "a finished run is not an orphan"


def test_a_flow_run_killed_by_sigkill_is_crashed_by_its_worker_and_its_mlflow_run_ends_killed(stack) -> None:
    """No sweep, no `cadre up`: the worker that watched the process sees it die, marks the run Crashed and runs the
    flow's `on_crashed` hook, which ends the MLflow run KILLED (what a worker on another machine does too)."""
    import time

    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from cadre.registry.runs import TAG_FLOW_RUN

    config, ports = stack
    assert run_cadre("deploy", config=config).returncode == 0
    mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        deployment = client.read_deployment_by_name("check/beta")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"watch_s": 240})
        deadline = time.monotonic() + 180
        tracked = []
        while not tracked and time.monotonic() < deadline:  # the flow has opened its MLflow run: it is mid-work
            time.sleep(1)
            tracked = mlflow.search_runs(
                [e.experiment_id for e in mlflow.search_experiments()],
                filter_string=f"tags.`{TAG_FLOW_RUN}` = '{run.id}'",
            )
        assert tracked, "the flow run never opened its MLflow run"
        pid = int(client.read_flow_run(run.id).infrastructure_pid.rpartition(":")[2])
        os.kill(pid, signal.SIGKILL)

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = mlflow.get_run(tracked[0].info.run_id).info.status
            if status != "RUNNING":
                break
            time.sleep(1)
        state = client.read_flow_run(run.id).state
        assert state.is_crashed(), state
        ended = mlflow.get_run(tracked[0].info.run_id)
        assert ended.info.status == "KILLED"
        assert ended.data.tags["cadre.ended_by"] == "Prefect Crashed hook"


def test_redeploy_keeps_a_schedule_paused_in_the_ui_and_follows_a_new_cron(stack) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    config, ports = stack
    original = config.read_text()
    scheduled = original.replace(
        "  evaluation: {suite: evals/suite}\n",
        '  evaluation: {suite: evals/suite}\n  schedules: {reindex: {cron: "0 3 * * *"}}\n',
        1,
    )
    assert scheduled != original
    try:
        config.write_text(scheduled)
        assert run_cadre("deploy", config=config).returncode == 0
        with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
            deployment = client.read_deployment_by_name("reindex/alpha")
            [schedule] = client.read_deployment_schedules(deployment.id)
            assert schedule.active and schedule.slug == "alpha-reindex" and schedule.schedule.cron == "0 3 * * *"
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)  # what the UI's toggle does

            config.write_text(scheduled.replace("0 3 * * *", "30 4 * * *"))
            redeploy = run_cadre("deploy", config=config)
            assert redeploy.returncode == 0 and "reindex/alpha: cron '30 4 * * *' UTC (paused)" in redeploy.stderr
            [after] = client.read_deployment_schedules(deployment.id)
            assert not after.active, "redeploying re-activated a schedule the user paused"
            assert after.slug == "alpha-reindex" and after.schedule.cron == "30 4 * * *"
    finally:
        config.write_text(original)
        run_cadre("deploy", config=config)


def test_removed_specialist_loses_its_deployments(stack) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    config, ports = stack
    original = config.read_text()
    try:
        write_stack_project(config.parent, ports, ["alpha"])
        deploy = run_cadre("deploy", config=config)
        assert deploy.returncode == 0, deploy.stderr
        assert "removed check/beta" in deploy.stderr
        with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
            client.read_deployment_by_name("check/alpha")
            with pytest.raises(ObjectNotFound):
                client.read_deployment_by_name("check/beta")
    finally:
        config.write_text(original)


def test_port_taken_by_another_program_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        config = write_stack_project(tmp_path, {"mlflow": taken, "prefect": free_port(), "lm": free_port()}, ["alpha"])
        result = run_cadre("up", "--only", "mlflow", config=config, timeout=60)
    assert result.returncode == 1
    assert f"port {taken}" in result.stderr and "already in use" in result.stderr
    assert not processes_under(tmp_path)


def test_killing_one_specialists_refresh_mid_training_leaves_the_others_flows_to_finish(stack) -> None:
    """alpha's refresh trains; beta's optimize starts beside it, and alpha's refresh is killed with SIGKILL (flow
    process and its training, as a reboot would) while both run. beta's optimize still completes and logs its
    evaluation; alpha's run is Crashed, and running alpha's refresh again completes."""
    import time

    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from cadre.registry.runs import TAG_FLOW_RUN

    config, ports = stack
    assert run_cadre("deploy", config=config).returncode == 0
    mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")

    def mlflow_run_of(flow_run_id):
        found = mlflow.search_runs(
            [e.experiment_id for e in mlflow.search_experiments()],
            filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'",
        )
        return found[0] if found else None

    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        smoke = {"budget": "smoke"}
        refresh = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("refresh-adapter/alpha").id, parameters=smoke
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # mid-training: the refresh's MLflow run has a loss
            time.sleep(1)
            tracked = mlflow_run_of(refresh.id)
            if tracked and "train/loss" in tracked.data.metrics:
                break
            assert not client.read_flow_run(refresh.id).state.is_final(), "the refresh ended before it was killed"
        else:
            raise AssertionError("alpha's refresh never started training")
        optimize = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("optimize-prompts/beta").id, parameters=smoke
        )
        while time.monotonic() < deadline and not client.read_flow_run(optimize.id).state.is_running():
            time.sleep(0.5)
        assert client.read_flow_run(optimize.id).state.is_running(), "beta's optimize never started"
        assert not client.read_flow_run(refresh.id).state.is_final(), "alpha's refresh ended before it was killed"
        pid = int(client.read_flow_run(refresh.id).infrastructure_pid.rpartition(":")[2])
        for victim in descendants(pid):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass

        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not all(
            client.read_flow_run(run.id).state.is_final() for run in (refresh, optimize)
        ):
            time.sleep(2)
        assert client.read_flow_run(refresh.id).state.is_crashed(), client.read_flow_run(refresh.id).state
        finished = client.read_flow_run(optimize.id).state
        assert finished.is_completed(), finished
        beta = mlflow_run_of(optimize.id)
        assert beta.info.status == "FINISHED" and "candidate_cases" in beta.data.metrics, beta.data.metrics

    again = run_cadre("run", "refresh", "-s", "alpha", "--budget", "smoke", config=config, timeout=900)
    # It finishes and its gates decide (promoted or refused: a completed state either way).
    assert again.returncode == 0, again.stderr[-3000:]
    assert "refresh-adapter/alpha Promoted in" in again.stderr or "refresh-adapter/alpha Refused in" in again.stderr
