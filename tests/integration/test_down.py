"""`cadre down` ends the flow runs its worker started: a re-index busy embedding is cancelled, its process gone,
its Prefect run Cancelled (not left Running for the next `cadre up` to crash) and its MLflow run KILLED;
`cadre down --wait` lets a run finish instead. Real stack (MLflow, Prefect server and worker), real flows.

The specialist's source is a python entrypoint written here: five short documents under the smoke cap, and a
stream of 200,000 under the full budget, so a full re-index is busy embedding for as long as the test needs
(what is tested is how `cadre down` ends a busy flow run, not a corpus).

Run: `python -m pytest -m integration tests/integration/test_down.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import free_port, processes_under

pytestmark = pytest.mark.integration

CADRE = [sys.executable, "-m", "cadre.cli"]
SERVICES = ["--only", "mlflow", "--only", "prefect", "--only", "worker"]  # a re-index needs no LM server
SUITE_CASES = 5
START_TIMEOUT_S = 240.0
SOURCE = """\
WORDS = "fever cough fracture rash anemia asthma gout migraine otitis eczema".split()


def load_documents(limit=None):
    for n in range(200_000 if limit is None else limit):  # the full budget: minutes of embedding
        words = " ".join(WORDS[(n + i) % len(WORDS)] for i in range(8))
        yield {"id": f"D{n:06d}", "text": f"code D{n:06d}: {words}"}
"""


def _write_project(root: Path) -> Path:
    (root / "suite").mkdir(parents=True, exist_ok=True)
    (root / "slow_source.py").write_text(SOURCE)
    cases = [
        {"phrase": f"code D{n:06d}", "code": f"D{n:06d}", "relevant_ids": [f"D{n:06d}"]} for n in range(SUITE_CASES)
    ]
    (root / "suite" / "test.jsonl").write_text("".join(json.dumps(case) + "\n" for case in cases), encoding="utf-8")
    ports = {name: free_port() for name in ("mlflow", "prefect", "lm")}
    path = root / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: downtest
          state_dir: state
          mlflow: {{port: {ports["mlflow"]}}}
          prefect: {{port: {ports["prefect"]}, work_pool: downtest-pool}}
          lm: {{port: {ports["lm"]}}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: coder
            description: maps a clinical phrase to its code
            sources:
              - {{kind: python, name: codes, entrypoint: "slow_source:load_documents"}}
            program:
              instruction: Answer with the ICD-10-CM code.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 3
            evaluation: {{suite: suite}}
            smoke: {{max_documents: {SUITE_CASES}, max_eval_cases: {SUITE_CASES}}}
        """)
    )
    return path


def _cadre(*args: str, config: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    return subprocess.run(
        [*CADRE, *args, "-c", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=env | {"OMP_NUM_THREADS": "1"},
    )


def _in_session(sid: int) -> list[int]:
    """Live processes of a session (a flow-run process and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    config = _write_project(tmp_path_factory.mktemp("down"))
    yield config
    _cadre("down", "--grace", "5", config=config)
    leftovers = processes_under(config.parent)
    for line in leftovers:  # never leave processes on the machine, even when failing
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not leftovers, "processes left behind:\n" + "\n".join(leftovers)


def _port(config: Path, service: str) -> str:
    return re.search(service + r": \{port: (\d+)", config.read_text()).group(1)


def _api(config: Path) -> str:
    return f"http://127.0.0.1:{_port(config, 'prefect')}/api"


def _mlflow(config: Path) -> str:
    return f"http://127.0.0.1:{_port(config, 'mlflow')}"


def _start_reindex(config: Path, budget: str):
    """Up, deploy (once), trigger a re-index and wait until it is embedding; returns (flow run id, its process id)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound

    up = _cadre("up", *SERVICES, config=config)
    assert up.returncode == 0, up.stdout + up.stderr
    with SyncPrefectClient(_api(config)) as client:
        try:  # deployed by the first test: the deployments outlive `cadre down` in Prefect's database
            deployment = client.read_deployment_by_name("reindex/coder")
        except ObjectNotFound:
            deploy = _cadre("deploy", config=config)
            assert deploy.returncode == 0, deploy.stderr
            deployment = client.read_deployment_by_name("reindex/coder")
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"budget": budget, "trigger_optimize": False}
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, f"the re-index did not start: {client.read_flow_run(run.id).state}"
            current = client.read_flow_run(run.id)
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            embedding = [
                task
                for task in client.read_task_runs(flow_run_filter=this_run)
                if task.name.startswith("build-index-version") and task.state and task.state.is_running()
            ]
            if current.state.is_running() and embedding and current.infrastructure_pid:
                return run.id, int(current.infrastructure_pid)
            assert not current.state.is_final(), current.state
            time.sleep(1.0)


def _states_after(config: Path, flow_run_id) -> tuple[str, str]:
    """The flow run's Prefect state and its MLflow run's status, read back with the stack up again (no worker)."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    up = _cadre("up", "--only", "mlflow", "--only", "prefect", config=config)
    assert up.returncode == 0, up.stderr
    with SyncPrefectClient(_api(config)) as client:
        state = client.read_flow_run(flow_run_id).state
    mlflow = MlflowClient(_mlflow(config))
    experiment = mlflow.get_experiment_by_name("downtest/coder")
    [run] = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`cadre.prefect_flow_run_id` = '{flow_run_id}'"
    )
    return state.type.value, run.info.status


def test_down_waits_for_a_run_to_finish_when_asked(project: Path) -> None:
    flow_run_id, pid = _start_reindex(project, "smoke")
    down = _cadre("down", "--wait", config=project)
    assert down.returncode == 0, down.stderr
    assert "waiting for 1 flow run(s) to finish" in down.stderr, down.stderr
    assert not _in_session(pid)
    state, mlflow_status = _states_after(project, flow_run_id)
    assert state in ("COMPLETED", "FAILED") and mlflow_status in ("FINISHED", "FAILED"), (state, mlflow_status)
    assert _cadre("down", config=project).returncode == 0


def test_down_ends_a_busy_flow_run_cancelled_and_its_mlflow_run_killed(project: Path) -> None:
    flow_run_id, pid = _start_reindex(project, "full")  # 200,000 documents: minutes of embedding
    time.sleep(5)
    assert _in_session(pid), "the flow-run process is not running"
    started = time.monotonic()
    down = _cadre("down", config=project)
    took = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    assert f"its process (pid {pid}) ended" in down.stderr and "killed (SIGKILL)" not in down.stderr, down.stderr
    assert re.search(r"flow run \S+ \(reindex/coder, Running\)", down.stderr), down.stderr
    assert "stopped worker" in down.stderr
    assert not _in_session(pid), "the flow-run process (or a child) outlived `cadre down`"
    state, mlflow_status = _states_after(project, flow_run_id)
    # Cancelled when the worker carried out the cancel, Crashed when it took SIGTERM from `cadre down` itself.
    assert state in ("CANCELLED", "CRASHED") and mlflow_status == "KILLED", (state, mlflow_status, down.stderr)
    print(f"cadre down ended the re-index and stopped the stack in {took:.1f} s:\n{down.stderr}")
