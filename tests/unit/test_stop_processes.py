"""How `cadre down` stops a flow-run process: SIGTERM to it and everything it started, SIGKILL after the grace."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cadre.platform.stack import _alive, child_pids, stop_processes

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
STARTS_A_CHILD = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(child.pid, flush=True); time.sleep(60)"
)


def _start(code: str) -> subprocess.Popen:
    """A process in a session of its own, as the Prefect worker starts a flow run."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)


def test_a_process_that_obeys_sigterm_ends_with_its_children_and_one_that_ignores_it_is_killed() -> None:
    obeys, ignores = _start(STARTS_A_CHILD), _start(IGNORES_SIGTERM)
    try:
        grandchild = int(obeys.stdout.readline())
        assert ignores.stdout.readline().strip() == "ready"
        assert child_pids(obeys.pid) == [grandchild]
        started = time.monotonic()
        ended = stop_processes([obeys.pid, ignores.pid], grace_s=2.0)
        took = time.monotonic() - started
        assert ended[obeys.pid] is not None and ended[obeys.pid] < 1.5
        assert ended[ignores.pid] is None  # still there after the grace: killed
        assert 2.0 <= took < 5.0
        obeys.wait(timeout=5)
        ignores.wait(timeout=5)
        deadline = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild), "a process the flow run started outlived it"
    finally:
        for process in (obeys, ignores):
            if process.poll() is None:
                os.killpg(process.pid, 9)
