"""SIGTERM as an exception: `Terminated` outside Prefect, Prefect's own handler kept inside a flow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cadre.platform.signals import Terminated, prefect_handles_sigterm, terminate_on_sigterm


def test_sigterm_raises_terminated_inside_the_block_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned_up = []
    with pytest.raises(Terminated, match="SIGTERM"), terminate_on_sigterm():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        finally:
            cleaned_up.append(True)
    assert cleaned_up == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_it_changes_nothing() -> None:
    seen = []

    def worker() -> None:
        with terminate_on_sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_inside_a_prefect_flow_run_prefects_handler_is_kept_and_raises() -> None:
    """Prefect's engine wraps every flow body in `capture_sigterm()`; replacing its handler would make a cancel from
    the UI or `cadre down` end the run Crashed instead of Cancelled. Run in a child: Prefect's handler, once its
    exception leaves `capture_sigterm`, kills the process."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from prefect.exceptions import TerminationSignal
        from prefect.utilities.engine import capture_sigterm
        from cadre.platform.signals import prefect_handles_sigterm, terminate_on_sigterm

        assert not prefect_handles_sigterm()
        with capture_sigterm():
            prefects = signal.getsignal(signal.SIGTERM)
            with terminate_on_sigterm():
                assert prefect_handles_sigterm() and signal.getsignal(signal.SIGTERM) is prefects
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                except TerminationSignal:
                    print("TerminationSignal raised in the flow body")
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "TerminationSignal raised in the flow body" in child.stdout
    assert not prefect_handles_sigterm()
