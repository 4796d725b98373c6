"""The production path, exercised on this machine: MLflow and Prefect keep their records in a real PostgreSQL
that `cadre up` starts (`project.database.backend: postgres`), MLflow runs several server workers, two Prefect
workers (each as if on its own machine, with a work queue of its own) run two specialists' flows at once, and the
registry's lock is contended through MLflow on PostgreSQL."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from support import descendants, free_port, processes_under, run_cadre, write_stack_project

pytestmark = pytest.mark.integration

POOL = "stacktest-pool"
HOSTS = ("host-a", "host-b")  # two workers, each polling a work queue of its own (host-a the pool's default too)


def _query(config: Path, service: str, sql: str, *params) -> list[tuple]:
    """Rows of `sql` in a service's database, read with PostgreSQL's own client library (not through the service)."""
    import psycopg2

    from cadre.config import load_config
    from cadre.platform.postgres import database_name

    loaded = load_config(config)
    database = loaded.project.database
    with psycopg2.connect(
        host=database.host, port=database.port, user="cadre", dbname=database_name(loaded, service)
    ) as db:
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()


def _start_worker(config: Path, host: str) -> subprocess.Popen:
    """A process worker named `host` that takes only the runs sent to its work queue (and host-a those sent to the
    pool's default queue, as `cadre run` does)."""
    from cadre.config import load_config
    from cadre.platform.env import cadre_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(cadre_env(load_config(config)), PREFECT_WORKER_QUERY_SECONDS="2")
    log = (config.parent / f"{host}.log").open("ab")
    queues = [host, "default"] if host == HOSTS[0] else [host]
    command = ["worker", "start", "--pool", POOL, "--type", "process", "--name", host]
    command += [option for queue in queues for option in ("--work-queue", queue)]
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), *command],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=config.parent,
        start_new_session=True,
    )


def _wait_online(ports: dict, workers: dict[str, subprocess.Popen], logs: Path, timeout_s: float = 120) -> None:
    """Return once Prefect lists every worker ONLINE (a run triggered before that finds no worker polling)."""
    from cadre.platform.stack import worker_online

    api = f"http://127.0.0.1:{ports['prefect']}/api"
    deadline = time.monotonic() + timeout_s
    waiting = set(workers)
    while waiting and time.monotonic() < deadline:
        for host in list(waiting):
            assert workers[host].poll() is None, (logs / f"{host}.log").read_text()[-3000:]
            if worker_online(api, POOL, host):
                waiting.discard(host)
        time.sleep(0.5)
    assert not waiting, f"workers {sorted(waiting)} not ONLINE in {POOL} after {timeout_s:.0f} s"


@pytest.fixture(scope="module")
def pg_stack():
    # Not under pytest's temporary folder: run as root, PostgreSQL runs as user `postgres`, and pytest's base
    # folder is closed to other users (mode 700).
    root = Path(tempfile.mkdtemp(prefix="cadre-pg-"))
    root.chmod(0o755)
    ports = {name: free_port() for name in ("mlflow", "prefect", "lm", "database")}
    # The shortest heartbeat timeout Cadre allows: a lost run is found within about two minutes.
    config = write_stack_project(root, ports, ["alpha", "beta"], mlflow_workers=3, heartbeat_timeout_s=90)
    workers: list[subprocess.Popen] = []
    try:
        up = run_cadre("up", *(f"--only={s}" for s in ("database", "mlflow", "prefect", "lm")), config=config)
        assert up.returncode == 0, up.stdout + up.stderr
        deploy = run_cadre("deploy", config=config)
        assert deploy.returncode == 0, deploy.stderr
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
            for host in HOSTS:
                client.create_work_queue(name=host, work_pool_name=POOL)
        workers = [_start_worker(config, host) for host in HOSTS]
        _wait_online(ports, dict(zip(HOSTS, workers, strict=True)), config.parent)
        yield config, ports, dict(zip(HOSTS, workers, strict=True))
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:  # a loaded machine: a worker slow to stop is killed, not waited on
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=30)
        down = run_cadre("down", config=config)
        leftovers = processes_under(root)
        for line in leftovers:  # never leave processes on the machine, even when failing
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not leftovers, "cadre down left processes behind:\n" + "\n".join(leftovers)


def test_mlflow_and_prefect_keep_their_records_in_postgresql(pg_stack) -> None:
    config, ports, _ = pg_stack
    status = run_cadre("status", "--json", config=config)
    services = {row["service"]: row for row in json.loads(status.stdout)["services"]}
    assert services["database"]["state"] == "up", services  # (its own worker is down: the test runs two others)
    assert services["database"]["url"] == f"postgresql://cadre@127.0.0.1:{ports['database']}"
    run = run_cadre("run", "check", "--specialist", "alpha", "--budget", "smoke", "--json", config=config)
    assert run.returncode == 0, run.stderr
    [report] = json.loads(run.stdout)
    assert report["state"] == "Completed", report
    # Read back from PostgreSQL itself: the flow run in Prefect's tables, the MLflow run in MLflow's.
    [(state,)] = _query(config, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", report["flow_run_id"])
    assert state == "COMPLETED"
    [(status_,)] = _query(config, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", report["mlflow_run_id"])
    assert status_ == "FINISHED"
    state_dir = config.parent / "state"
    assert not (state_dir / "mlflow" / "mlflow.db").exists() and not (state_dir / "prefect" / "prefect.db").exists()
    [server] = [int(line.split(":")[0]) for line in processes_under(config.parent) if "mlflow server" in line]
    command = Path(f"/proc/{server}/cmdline").read_bytes().decode().split("\0")
    assert command[command.index("--workers") + 1] == "3", command


def test_the_registry_lock_holds_on_postgresql_with_several_mlflow_workers(pg_stack, tmp_path) -> None:
    import test_registry
    from mlflow import MlflowClient

    _, ports, _ = pg_stack
    uri = f"http://127.0.0.1:{ports['mlflow']}"
    test_registry.assert_concurrent_promotions_are_serialized(
        MlflowClient(uri, uri), f"t{uuid.uuid4().hex[:8]}", uri, tmp_path
    )


def test_two_workers_run_two_specialists_flows_at_once_and_lose_nothing(pg_stack) -> None:
    """alpha's optimize on one worker, beta's on the other, at the same time: both complete, each wrote its MLflow
    run, its candidate's version and the gates' decision, and every run each worker finished is in PostgreSQL."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from cadre.registry.runs import TAG_FLOW_RUN
    from cadre.registry.versions import history

    config, ports, _ = pg_stack
    mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        runs = {
            name: client.create_flow_run_from_deployment(
                client.read_deployment_by_name(f"optimize-prompts/{name}").id,
                parameters={"budget": "smoke"},
                work_queue_name=host,
            )
            for name, host in zip(("alpha", "beta"), HOSTS, strict=True)
        }
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not all(
            client.read_flow_run(run.id).state.is_final() for run in runs.values()
        ):
            time.sleep(2)
        finished = {name: client.read_flow_run(run.id) for name, run in runs.items()}
    for name, host in zip(("alpha", "beta"), HOSTS, strict=True):
        flow_run = finished[name]
        assert flow_run.state.is_completed(), (name, flow_run.state)
        assert flow_run.labels.get("prefect.worker.name") == host, flow_run.labels
    alpha, beta = finished["alpha"], finished["beta"]
    assert alpha.start_time < beta.end_time and beta.start_time < alpha.end_time, "the two flows did not overlap"

    for name, flow_run in finished.items():
        [tracked] = mlflow.search_runs(
            [mlflow.get_experiment_by_name(f"stacktest/{name}").experiment_id],
            filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run.id}'",
        )
        assert tracked.info.status == "FINISHED" and "candidate_cases" in tracked.data.metrics, tracked.data.metrics
        decided = history(mlflow, "stacktest", name, "program")
        assert decided and decided[-1].event in ("promotion", "refusal"), decided
        [(rows,)] = _query(config, "mlflow", "SELECT count(*) FROM runs WHERE run_uuid = %s", tracked.info.run_id)
        assert rows == 1


def test_a_run_lost_with_its_worker_is_crashed_by_prefect_and_its_mlflow_run_ends_killed(pg_stack) -> None:
    """host-b and the run it executes are killed together (SIGKILL), as when its machine dies: no worker sees the
    process end and no `/proc` sweep runs. Prefect's heartbeat automation marks the run Crashed; the Crashed event
    runs the project's `end-crashed-tracking` deployment on host-a, which ends the MLflow run KILLED."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from cadre.registry.runs import TAG_FLOW_RUN

    config, ports, workers = pg_stack
    mlflow = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        [automation] = client.read_automations_by_name("stacktest: crash flow runs whose heartbeat stopped")
        assert automation.trigger.within.total_seconds() == 90  # project.prefect.heartbeat_timeout_s
        run = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("check/beta").id, parameters={"watch_s": 600}, work_queue_name=HOSTS[1]
        )
        deadline = time.monotonic() + 180
        tracked = []
        while not tracked and time.monotonic() < deadline:  # mid-run: its MLflow run is open
            time.sleep(1)
            tracked = mlflow.search_runs(
                [mlflow.get_experiment_by_name("stacktest/beta").experiment_id],
                filter_string=f"tags.`{TAG_FLOW_RUN}` = '{run.id}'",
            )
        assert tracked, "the flow run never opened its MLflow run"
        for victim in descendants(workers[HOSTS[1]].pid):  # the worker and the run's process: the machine is gone
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.monotonic()

        deadline = killed_at + 300
        while time.monotonic() < deadline and mlflow.get_run(tracked[0].info.run_id).info.status == "RUNNING":
            time.sleep(2)
        found_after_s = time.monotonic() - killed_at
        state = client.read_flow_run(run.id).state
        assert state.is_crashed() and "no heartbeat for 90 s" in state.message, state
        ended = mlflow.get_run(tracked[0].info.run_id)
        assert ended.info.status == "KILLED", ended.info
        assert ended.data.tags["cadre.ended_by"] == "Prefect automation: flow run Crashed"
        reaper = client.read_deployment_by_name("end-crashed-tracking/stacktest")
        [ender] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[reaper.id]))
        )
        assert ender.parameters["crashed"] == f"prefect.flow-run.{run.id}"
        assert ender.labels.get("prefect.worker.name") == HOSTS[0] and ender.state.is_completed(), ender
    print(f"lost run found and its MLflow run ended {found_after_s:.0f} s after the kill")


def test_prefect_accepts_the_kubernetes_base_job_template(pg_stack) -> None:
    """`prefect work-pool create cadre --type kubernetes --base-job-template infra/k8s/base-job-template.json`, as
    infra/README.md says, against the real server: it checks each placeholder against the declared variables."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate

    _, ports, _ = pg_stack
    template = json.loads((Path(__file__).resolve().parents[2] / "infra/k8s/base-job-template.json").read_text())
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        client.create_work_pool(WorkPoolCreate(name="k8s-check", type="kubernetes", base_job_template=template))
        stored = client.read_work_pool("k8s-check").base_job_template
        assert stored["variables"]["properties"]["gpu_count"]["default"] == 0
        broken = copy.deepcopy(template)
        broken["variables"]["properties"].pop("state_claim")  # a placeholder nothing declares
        with pytest.raises(Exception, match="state_claim"):
            client.create_work_pool(WorkPoolCreate(name="k8s-broken", type="kubernetes", base_job_template=broken))
