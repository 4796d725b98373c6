"""Every flow's MLflow run ends as the flow run did: FINISHED, FAILED on an error, KILLED when the process is stopped.

Real MLflow server and real Prefect (the test harness; the stopped flow runs in its own process against the
harness's server, as a worker's flow-run process does), no mocks.

Run: `python -m pytest -m integration tests/integration/test_tracked_run.py` (about a minute).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow
from support import project_name

from cadre.config import load_config
from cadre.platform.env import OFFLINE_ENV
from tasks.tracking import tracked_run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 90.0


@pytest.fixture
def config_path(tmp_path: Path, mlflow_server: str) -> Path:
    (tmp_path / "suite").mkdir()
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {project_name("tracked", tmp_path)}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
        specialists:
          - name: coder
            description: test
            program:
              instruction: Code it.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 0
            evaluation: {{suite: suite}}
        """)
    )
    return path


@flow(name="tracked-run-test")
def ends_with(config_path: str, how: str) -> str:
    config = load_config(config_path)
    with tracked_run(config, "coder", "check", "smoke") as handle:
        if how == "return":
            return handle.run_id  # an early return closes the run like the end of the block
        raise ValueError(f"step failed in run {handle.run_id}")
    return "unreachable"


def test_an_error_ends_the_run_failed_an_early_return_finished(
    config_path: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    client = MlflowClient(mlflow_server)
    finished = ends_with(str(config_path), "return")
    assert client.get_run(finished).info.status == "FINISHED"
    with pytest.raises(ValueError, match="step failed in run") as error:
        ends_with(str(config_path), "raise")
    run_id = str(error.value).rsplit(" ", 1)[1]
    assert client.get_run(run_id).info.status == "FAILED"


STOPPED_FLOW = """
import sys, time
from prefect import flow
from cadre.config import load_config
from tasks.tracking import tracked_run

@flow(name="tracked-run-stopped")
def busy(config_path: str) -> None:
    config = load_config(config_path)
    with tracked_run(config, "coder", "check", "smoke") as handle:
        print("RUN " + handle.run_id, flush=True)
        time.sleep(300)

busy(sys.argv[1])
"""


def test_sigterm_ends_the_run_killed(config_path: Path, mlflow_server: str, harness: None) -> None:
    """What `cadre down`, a worker shutting down or a cancel does to a flow-run process."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, **OFFLINE_ENV, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED_FLOW, str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not any(line.startswith("RUN ") for line in output):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(output)[-3000:]
            assert time.monotonic() < deadline, "the flow did not open its run in time:\n" + "".join(output)[-3000:]
            output.append(line)
        run_id = next(line for line in output if line.startswith("RUN ")).split()[1]
        client = MlflowClient(mlflow_server)
        assert client.get_run(run_id).info.status == "RUNNING"
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode != 0, "".join(output) + rest
    assert client.get_run(run_id).info.status == "KILLED", "".join(output) + rest
