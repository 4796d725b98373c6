"""Fixtures of the integration tier: real services, started once per test session.

`mlflow_server` runs a real `mlflow server` (SQLite backend, local artifact store, one worker) on a
free loopback port, and stops its whole process group afterwards. Run the
tier with `python -m pytest -m integration tests/integration`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from cadre.platform.env import OFFLINE_ENV

MLFLOW_START_TIMEOUT_S = 90.0


def _mlflow_executable() -> str:
    # The server must be the one installed beside the interpreter running the tests, not one on PATH.
    candidate = Path(sys.executable).with_name("mlflow")
    return str(candidate) if candidate.exists() else "mlflow"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _stop_group(process: subprocess.Popen) -> None:
    """Stop the server and every worker it forked: SIGTERM to the group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server and model registry for this test session; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    command = [
        _mlflow_executable(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # Without these the server starts 13 processes, phones home and fetches price lists.
    env = {**os.environ, **OFFLINE_ENV}
    with log_path.open("wb") as log:
        # A new session makes the server the leader of its own process group, so teardown can stop
        # the workers it forks (uvicorn/gunicorn) along with it and leave nothing behind.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while not _healthy(f"{uri}/health"):
            if process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {MLFLOW_START_TIMEOUT_S:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.25)
        yield uri
    finally:
        _stop_group(process)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """Prefect's test harness: flows called in-process record to a throwaway server."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # a shared 2-core box can take a while
        yield


@pytest.fixture()
def clean_environment() -> Iterator[None]:
    """The flow applies the project's environment to the process; give the session its own back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
