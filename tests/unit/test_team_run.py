"""The demo's specialists' cycles side by side (`cadre.orchestration.demo.TeamRun`).

The chains here are plain functions standing in for `run_chain` (which triggers real flow runs; the e2e demo test
runs that): what is checked is the team runner's own work, running chains at once, keeping each step's report in
one piece, and letting the other chains finish when one raises.
"""

from __future__ import annotations

import io
import threading
import time

from rich.console import Console

from cadre.orchestration.demo import StepOutcome, TeamRun


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120, color_system=None, force_interactive=False), out


def test_chains_run_at_once_and_each_steps_report_prints_whole() -> None:
    console, out = _console()
    running, most = set(), [0]
    lock = threading.Lock()

    def chain(config, name, budget, chain_console, on_step, outcomes, env):
        for step in ("reindex", "optimize"):
            on_step(step, None)
            on_step(step, f"http://prefect/{name}/{step}")
            with lock:
                running.add(name)
                most[0] = max(most[0], len(running))
            for line in range(3):  # written slowly, so the other chains write in between
                chain_console.print(f"{name} {step} line {line}")
                time.sleep(0.05)
            with lock:
                running.discard(name)
            outcomes.append(StepOutcome(name, step, True, 0.15))
        return outcomes

    outcomes = TeamRun(None, ["a", "b", "c"], "smoke", console, chain=chain).run(width=3)

    assert most[0] >= 2, "the chains never ran at the same time"
    assert [(o.specialist, o.flow) for o in outcomes] == [
        (name, step) for name in "abc" for step in ("reindex", "optimize")
    ]
    printed = out.getvalue()
    assert all(f"… {name}: reindex started, flow run http://prefect/{name}/reindex" in printed for name in "abc")
    lines = [line for line in printed.splitlines() if " line " in line]
    for name in "abc":
        for step in ("reindex", "optimize"):
            block = [i for i, line in enumerate(lines) if line.startswith(f"{name} {step} ")]
            assert block == list(range(block[0], block[0] + 3)), f"{name} {step}'s report was split: {lines}"


def test_one_chain_raising_leaves_the_others_to_finish() -> None:
    console, out = _console()

    def chain(config, name, budget, chain_console, on_step, outcomes, env):
        on_step("reindex", None)
        outcomes.append(StepOutcome(name, "reindex", True, 0.0))
        on_step("optimize", None)
        if name == "b":
            raise RuntimeError("the LM went away")
        time.sleep(0.1)
        outcomes.append(StepOutcome(name, "optimize", True, 0.1))
        return outcomes

    outcomes = TeamRun(None, ["a", "b", "c"], "smoke", console, chain=chain).run(width=2)

    by_name = {(o.specialist, o.flow): o.completed for o in outcomes}
    assert by_name == {
        ("a", "reindex"): True,
        ("a", "optimize"): True,
        ("b", "reindex"): True,
        ("b", "optimize"): False,
        ("c", "reindex"): True,
        ("c", "optimize"): True,
    }
    assert "b: the cycle stopped: RuntimeError: the LM went away" in out.getvalue()


def test_reports_survive_another_chain_pointing_the_console_at_dev_null(tmp_path) -> None:
    """llama.cpp loads a model quietly by pointing the process's stderr at /dev/null for a moment; a report another
    chain prints in that moment still reaches the console's file."""
    import os

    target = (tmp_path / "console.txt").open("w", buffering=1)
    console = Console(file=target, width=120, color_system=None, force_interactive=False)
    descriptor = target.fileno()

    def chain(config, name, budget, chain_console, on_step, outcomes, env):
        on_step("reindex", None)
        if name == "quiet":  # what llama.cpp's quiet model load does to fd 2
            saved, null = os.dup(descriptor), os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, descriptor)
            time.sleep(0.6)
            os.dup2(saved, descriptor)
            os.close(saved)
            os.close(null)
        else:
            time.sleep(0.2)
            chain_console.print(f"{name}'s reindex report")
        outcomes.append(StepOutcome(name, "reindex", True, 0.2))
        on_step("optimize", None)  # prints the reindex report while the quiet chain still points at /dev/null
        time.sleep(0.6)
        return outcomes

    TeamRun(None, ["quiet", "loud"], "smoke", console, chain=chain).run(width=2)
    target.close()

    assert "loud's reindex report" in (tmp_path / "console.txt").read_text()


def test_a_step_started_after_the_other_chains_ended_gets_the_cores_they_left(monkeypatch) -> None:
    """Each flow run's threads are its share of the cores among the chains running as it starts: on 2 cores, 1 while
    three or two run, 2 for the last chain's steps once the others are done."""
    from types import SimpleNamespace

    from cadre.config.project import ThreadSettings
    from cadre.orchestration.demo import thread_shares

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    config = SimpleNamespace(project=SimpleNamespace(threads=ThreadSettings(torch=2, embedding=2)))
    console, _ = _console()
    asked: dict[tuple[str, str], str] = {}
    short_done = threading.Barrier(3)

    def chain(config, name, budget, chain_console, on_step, outcomes, env):
        steps = ("reindex", "optimize", "refresh") if name == "long" else ("reindex",)
        for number, step in enumerate(steps):
            on_step(step, None)
            asked[(name, step)] = env()["CADRE_TORCH_THREADS"]
            if number == 0:
                short_done.wait(timeout=5)  # every chain has asked for its first step's share
            if name == "long" and step == "reindex":
                time.sleep(0.3)  # the short chains end meanwhile
            outcomes.append(StepOutcome(name, step, True, 0.0))
        return outcomes

    TeamRun(config, ["long", "a", "b"], "smoke", console, chain=chain, shares=lambda n: thread_shares(config, n)).run(
        width=3
    )

    assert asked[("long", "reindex")] == asked[("a", "reindex")] == asked[("b", "reindex")] == "1"
    assert asked[("long", "optimize")] == asked[("long", "refresh")] == "2"
