"""Orchestration overhead, measured side by side in one run.

1. A flow of 10 no-op tasks run against Cadre's local Prefect server vs. the same 10 functions called
   as plain Python (the ratio is what Prefect's bookkeeping costs per flow run); the fixed cost of a flow
   run (0 tasks) and the cost per task (from a 100-task flow) split it.
2. `cadre validate` on the shipped pipelines.yaml: in-process (load + validate) and as a command.

Run: `.venv/bin/python bench/overhead.py [--runs 5]` (starts the Prefect server with `cadre up --only
prefect` when none is running, and stops it again afterwards).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadre.config import load_config
from cadre.platform.env import apply_env
from cadre.platform.stack import Stack

console = Console(width=120)


def noop(value: int) -> int:
    return value + 1


def plain_ten(start: int = 0) -> int:
    value = start
    for _ in range(10):
        value = noop(value)
    return value


def _median_ms(function, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="flow runs to time (median reported)")
    parser.add_argument("--config", default=str(ROOT / "pipelines.yaml"))
    args = parser.parse_args()

    config = load_config(args.config)
    apply_env(config)  # before Prefect is imported: it reads its settings at import
    stack = Stack(config)
    started_here = False
    if not any(row["service"] == "prefect" and row["state"] == "up" for row in stack.status()):
        console.print("starting the Prefect server for the benchmark …")
        stack.up(services=["prefect"], console=console)
        started_here = True
    try:
        from prefect import flow, task

        noop_task = task(noop, name="noop")

        def tasks_flow(count: int):
            @flow(name=f"bench-overhead-{count}-tasks")
            def run(start: int = 0) -> int:
                value = start
                for _ in range(count):
                    value = noop_task(value)
                return value

            return run

        ten_tasks, hundred_tasks = tasks_flow(10), tasks_flow(100)

        @flow(name="bench-overhead-0-tasks")
        def no_tasks(start: int = 0) -> int:
            return plain_ten(start)

        for warm_up in (ten_tasks, hundred_tasks, no_tasks):  # registers the flows, opens the client
            warm_up()
        flow_ms, flow_all = _median_ms(ten_tasks, args.runs)
        empty_ms, _ = _median_ms(no_tasks, args.runs)
        hundred_ms, _ = _median_ms(hundred_tasks, args.runs)
        plain_ms, _ = _median_ms(lambda: [plain_ten() for _ in range(1000)], args.runs)
        plain_ms /= 1000
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # the flow runs' logs reach the server before it stops
    finally:
        if started_here:
            stack.down(console=console)

    validate_ms, _ = _median_ms(lambda: load_config(args.config), 20)
    command_ms, _ = _median_ms(
        lambda: subprocess.run(
            [sys.executable, "-m", "cadre.cli", "validate", args.config], check=True, capture_output=True
        ),
        3,
    )

    table = Table(title="Orchestration overhead (median)", title_justify="left")
    for column in ("what", "ours (Cadre + Prefect server)", "bare", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        "10 no-op tasks in one flow",
        f"{flow_ms:.0f} ms",
        f"{plain_ms * 1000:.2f} µs (plain Python)",
        f"{flow_ms / plain_ms:,.0f}×",
    )
    table.add_row("  of which: the flow run itself (0 tasks)", f"{empty_ms:.0f} ms", "", "")
    # Per task from a 100-task flow: the 10-task flow's difference to the empty one is within its noise.
    per_task_ms = (hundred_ms - empty_ms) / 100
    table.add_row(
        "  of which: per task (from a 100-task flow)",
        f"{per_task_ms:.1f} ms",
        f"{plain_ms * 100:.3f} µs",
        f"{per_task_ms / (plain_ms / 10):,.0f}×",
    )
    table.add_row("cadre validate (in-process)", f"{validate_ms:.1f} ms", "", "")
    table.add_row("cadre validate (command)", f"{command_ms:.0f} ms", "", "")
    console.print(table)
    console.print(
        f"flow runs: {', '.join(f'{t:.0f}' for t in flow_all)} ms. Most of a flow run's fixed cost is Prefect "
        "joining its 1-second heartbeat thread at exit; next to flows that embed, train or call an LM for minutes, "
        "both costs are noise."
    )


if __name__ == "__main__":
    main()
