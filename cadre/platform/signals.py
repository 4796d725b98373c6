"""SIGTERM as an exception, so a flow-run process ends its MLflow run and exits promptly when stopped.

`cadre down`, a worker shutting down and Prefect's cancellation all send SIGTERM. Python's default is to
die at once, leaving the MLflow run RUNNING; a process busy in native code (torch) may not die at all
until SIGKILL. Inside `terminate_on_sigterm()` SIGTERM raises `Terminated` in the main thread instead,
which unwinds through the flow's `finally` blocks (its MLflow run ends as KILLED).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):  # a signal, like KeyboardInterrupt, not an error
    """The process was asked to stop (SIGTERM)."""


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Raise `Terminated` on SIGTERM while inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
