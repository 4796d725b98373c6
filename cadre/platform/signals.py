"""SIGTERM as an exception, so a process told to stop unwinds through its `finally` blocks and exits promptly.

`cadre down`, a worker shutting down and Prefect's cancellation all send SIGTERM. Python's default is to die
at once, leaving the MLflow run RUNNING. Inside `terminate_on_sigterm()` SIGTERM raises in the main thread
instead, which unwinds through the flow's `finally` blocks (its MLflow run ends as KILLED).

Inside a Prefect flow run the engine already does this, and `terminate_on_sigterm()` leaves it alone. Checked in
Prefect 3.9.1 (`flow_engine.py`, `utilities/engine/__init__.py: capture_sigterm`): a process worker starts each
flow run as `python -m prefect.engine` in a session of its own; a sync flow's body runs in that process's main
thread, inside `capture_sigterm()`, whose handler raises `TerminationSignal` (a `BaseException`). The engine
catches it and marks the run Cancelled when the runner announced a cancel on its control channel, else Crashed,
then re-sends SIGTERM to itself with the default handler, so the process ends. The runner only announces a cancel
while Prefect's own handler is installed (`can_ack_control_intent`), so replacing it would turn every cancel
into a crash: hence it is kept. No `PREFECT_*` setting changes any of this.

A handler runs between bytecodes, so a native call delays it until it returns: in a torch training loop that is
at most the current forward or backward pass (one training step of the tiny test model: milliseconds;
`tests/unit/test_finetune.py` measures a trl training loop stopping).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):  # a signal, like KeyboardInterrupt, not an error
    """The process was asked to stop (SIGTERM)."""


def prefect_handles_sigterm() -> bool:
    """Whether Prefect's flow engine has its SIGTERM handler installed (this code runs inside a flow run)."""
    try:
        from prefect.utilities.engine import is_prefect_sigterm_handler_installed
    except ImportError:  # pragma: no cover - Prefect is a dependency; another version may move it
        return False
    return is_prefect_sigterm_handler_installed()


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Make SIGTERM raise in the main thread while inside the block.

    Raises `Terminated`, or Prefect's `TerminationSignal` inside a flow run (Prefect's handler is kept, see the
    module docstring). Outside the main thread signals cannot be handled and this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or prefect_handles_sigterm():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
