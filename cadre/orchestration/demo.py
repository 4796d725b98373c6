"""The main job (`cadre demo`): bring the stack up, prepare models, deploy, run the team's full cycle.

Each flow runs through its Prefect deployment (so it shows in the Prefect UI exactly like a
scheduled run) in the order the loop needs, the order of the stage table (`cadre.stages.SCHEDULED`):
re-index → optimize prompts → refresh adapter → learn from feedback, then the specialist's champions are
exported as an offline bundle and judged beside the server (`cadre.edge.judge`). The job ends with a summary a
person can act on: what ran, how it ended, what was promoted or refused and why, and where to look.

The specialists' chains run side by side (`parallel`, default all of them), as a team's scheduled runs would: each
chain is one thread that triggers its flow runs one after another and follows them; the worker runs the flow runs
in their own processes. While they run, one status line says where each chain is; each step's report is printed
whole when the step ends (a chain writes to its own buffer, so reports never interleave). One chain's failure
stops only that chain. With `parallel=1` the chains run one after another and print as they go.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cadre.config import CadreConfig
from cadre.orchestration.deployments import crash_orphaned_runs, deploy_all, run_now
from cadre.platform.stack import Stack
from cadre.runtime.base_model import prepare_models
from cadre.stages import SCHEDULED


@dataclass
class StepOutcome:
    specialist: str
    flow: str
    completed: bool
    seconds: float


def run_demo(
    config: CadreConfig, budget: str = "smoke", console: Console | None = None, parallel: int | None = None
) -> bool:
    """Run the whole main job; returns True when every step completed.

    Args:
        parallel: how many specialists' chains run at once (None: all of them; 1: one after another).
    """
    console = console or Console(stderr=True)
    started, started_at = time.monotonic(), datetime.now(UTC)
    console.rule("[bold]Cadre[/bold] — the demo team's full cycle")
    prepare_models(config, console=console)
    stack = Stack(config)
    stack.up(console=console)
    crash_orphaned_runs(config, console)
    deploy_all(config, console=console)
    names = [specialist.name for specialist in config.specialists]
    width = max(1, min(parallel or len(names), len(names)))
    if width == 1:
        outcomes = [outcome for name in names for outcome in run_chain(config, name, budget, console)]
    else:
        outcomes = TeamRun(config, names, budget, console, shares=functools.partial(thread_shares, config)).run(width)
    print_summary(config, outcomes, time.monotonic() - started, console, since=started_at)
    return all(o.completed for o in outcomes)


def run_chain(
    config: CadreConfig,
    specialist: str,
    budget: str,
    console: Console,
    on_step: Callable[[str, str | None], None] | None = None,
    outcomes: list[StepOutcome] | None = None,
    env: Callable[[], dict[str, str]] | None = None,
) -> list[StepOutcome]:
    """One specialist's cycle, stage after stage, then its edge export.

    Args:
        on_step: told each step's name as it starts (`on_step(kind, None)`), and again with its flow run's URL in the
            Prefect UI once the flow run exists (`on_step(kind, url)`).
        outcomes: where each step's outcome is appended as it ends (a new list if None); returned.
        env: asked as each step starts for the environment variables of its flow run's process (its CPU threads when
            chains run side by side: its share of the cores at that moment).
    """
    outcomes = [] if outcomes is None else outcomes
    for kind in SCHEDULED:
        if on_step is not None:
            on_step(kind, None)
        console.rule(f"{kind} · {specialist} · budget {budget}")
        step_started = time.monotonic()
        # The cycle runs optimize right after re-index and embedder itself, so they must not queue another.
        extra = {"trigger_optimize": False} if kind in ("reindex", "embedder") else None
        completed = run_now(
            config,
            kind,
            specialist,
            budget=budget,
            console=console,
            parameters=extra,
            env=env() if env is not None else None,
            on_started=(lambda url, kind=kind: on_step(kind, url)) if on_step is not None else None,
        )
        if (
            kind == "reindex"
            and completed
            and config.specialist(specialist).sources
            and not _has_live_index(config, specialist)
        ):
            console.print(
                "[yellow]the re-index ended without a live index (it stopped at the budget's wall-time cap "
                "before its build was complete, or its gates refused the first version)[/yellow]"
            )
            completed = False
        outcomes.append(StepOutcome(specialist, kind, completed, time.monotonic() - step_started))
        if not completed and kind == "reindex":
            console.print(
                "[yellow]re-index failed: skipping the later flows of this specialist (they would search a stale "
                "or missing index)[/yellow]"
            )
            break
    if on_step is not None:
        on_step("edge export", None)
    outcomes.append(export_bundle_step(config, specialist, console))
    return outcomes


def thread_shares(config: CadreConfig, running: int) -> dict[str, str]:
    """The CPU threads of a flow run started while `running` chains run (itself included): its share of the cores,
    at most the configured count. Threads beyond the cores make torch's and llama.cpp's threads wait on each other
    (on 2 cores, three flows of 2 threads each trained 4x slower than one alone), so the chains share the cores; a
    chain left alone gets them all."""
    share = max(1, (os.cpu_count() or 1) // max(1, running))
    threads = config.project.threads
    return {
        "CADRE_TORCH_THREADS": str(min(threads.torch, share)),
        "CADRE_EMBEDDING_THREADS": str(min(threads.embedding, share)),
    }


class TeamRun:
    """The specialists' chains side by side, at most `width` at once, each in its own thread.

    A chain prints into its own buffer; when one of its steps ends, the buffer is printed whole on the console. A
    status line shows where every chain is. A chain that raises ends as a failed step; the others go on.
    """

    def __init__(
        self,
        config: CadreConfig,
        names: list[str],
        budget: str,
        console: Console,
        chain: Callable[..., list[StepOutcome]] | None = None,
        shares: Callable[[int], dict[str, str]] | None = None,
    ) -> None:
        """`chain` runs one specialist's cycle, with `run_chain`'s arguments (default: `run_chain`). `shares(n)` is the
        environment of a flow run started while n chains run (`thread_shares`), asked as each step starts: a step
        started after the other chains ended gets the cores they left."""
        self.config, self.names, self.budget, self.console = config, names, budget, console
        self.chain = chain or run_chain
        self.shares = shares
        self.lock = threading.Lock()
        self.where: dict[str, str] = dict.fromkeys(names, "waiting")
        self.since: dict[str, float] = {}
        self.outcomes: dict[str, list[StepOutcome]] = {}

    def run(self, width: int) -> list[StepOutcome]:
        threads_note = (
            f", each flow run with its share of the {os.cpu_count()} cores as it starts" if self.shares else ""
        )
        self.console.print(
            f"running the {len(self.names)} specialists' cycles side by side ({width} at once{threads_note}); each "
            "step's report is printed when it ends"
        )
        # Print through a copy of the console's file descriptor: while one chain's edge export loads a model, llama.cpp
        # points fd 2 at /dev/null (`cadre.runtime.lm.load_llama`), and the other chains' reports would vanish with it.
        restore, stream = self.console.file, _duplicate(self.console.file)
        if stream is not None:
            self.console.file = stream
        try:
            return self._run(width)
        finally:
            if stream is not None:
                self.console.file = restore
                stream.close()

    def _run(self, width: int) -> list[StepOutcome]:
        slots = threading.Semaphore(width)
        env = functools.partial(self._env, width) if self.shares else None
        threads = [threading.Thread(target=self._chain, args=(name, slots, env), daemon=True) for name in self.names]
        for thread in threads:
            thread.start()
        with self.console.status(self._status_line()) as status:
            while any(thread.is_alive() for thread in threads):
                status.update(self._status_line())
                for thread in threads:
                    thread.join(timeout=1.0 / len(threads))
        return [outcome for name in self.names for outcome in self.outcomes.get(name, [])]

    def _chain(self, name: str, slots: threading.Semaphore, env: Callable[[], dict[str, str]] | None) -> None:
        buffer = io.StringIO()
        chain_console = Console(
            file=buffer, width=self.console.width, color_system="truecolor", force_interactive=False, highlight=False
        )

        def on_step(kind: str, url: str | None) -> None:
            if url is not None:  # its flow run exists: where to watch it, at once rather than when it ends
                self.console.print(f"… {name}: {kind} started, flow run {url}", highlight=False)
                return
            self._flush(buffer)
            with self.lock:
                self.where[name], self.since[name] = kind, time.monotonic()
            if kind not in SCHEDULED:  # a step of the demo itself: no flow run will announce it
                self.console.print(f"… {name}: {kind} started", highlight=False)

        outcomes = self.outcomes.setdefault(name, [])
        now = time.monotonic()
        with slots:
            try:
                self.chain(
                    self.config,
                    name,
                    self.budget,
                    chain_console,
                    on_step=on_step,
                    outcomes=outcomes,
                    env=env,
                )
            except Exception as error:  # noqa: BLE001 - one chain's failure must not stop the others
                chain_console.print(f"[red]{name}: the cycle stopped: {type(error).__name__}: {error}[/red]")
                outcomes.append(
                    StepOutcome(name, self.where[name], False, time.monotonic() - self.since.get(name, now))
                )
            finally:
                self._flush(buffer)
                with self.lock:
                    self.where[name] = "done"

    def _env(self, width: int) -> dict[str, str]:
        """The environment of a flow run starting now: its share of the cores among the chains that run now or are
        about to (every chain not done, at most `width` of them: all start together, and one waiting for a slot
        takes the slot of the next to end)."""
        with self.lock:
            running = min(width, sum(where != "done" for where in self.where.values()))
        return self.shares(running)

    def _flush(self, buffer: io.StringIO) -> None:
        """Print what a chain wrote since the last flush, in one piece."""
        with self.lock:
            text = buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        if text.strip():
            self.console.print(Text.from_ansi(text.rstrip("\n")))

    def _status_line(self) -> str:
        now = time.monotonic()
        with self.lock:
            parts = [
                f"{name}: {where}"
                + (f" {now - self.since[name]:.0f}s" if name in self.since and where != "done" else "")
                for name, where in self.where.items()
            ]
        return " · ".join(parts)


def _has_live_index(config: CadreConfig, specialist: str) -> bool:
    from cadre.knowledge.reindex import live_version

    return live_version(config.state_dir, specialist) is not None


def export_bundle_step(config: CadreConfig, specialist: str, console: Console) -> StepOutcome:
    """The cycle's last step: the specialist's champions as an offline bundle, judged before it is published.

    A refused bundle is an outcome, not a failure (the report says why); a bundle that cannot be made (e.g. no
    champion index yet) fails the step.
    """
    from rich.markdown import Markdown

    from cadre.edge import BundleError
    from cadre.edge.judge import publish_bundle

    console.rule(f"edge export · {specialist}")
    step_started = time.monotonic()
    target = config.state_dir / "bundles" / specialist
    cases = config.specialist(specialist).edge.cases
    console.print(f"bundling the champions, then answering {cases} test cases with the bundle beside the server …")
    try:
        publication = publish_bundle(config, specialist, target)
    except Exception as error:  # noqa: BLE001 - the cycle's summary must still print; the step is marked failed
        message = str(error) if isinstance(error, BundleError | ValueError) else f"{type(error).__name__}: {error}"
        console.print(f"[red]edge export failed: {message}[/red]")
        return StepOutcome(specialist, "edge export", False, time.monotonic() - step_started)
    console.print(Markdown(publication.judgement.to_markdown()))
    if publication.published:
        console.print(f'published: {publication.folder}; try `cadre answer --bundle {publication.folder} "…"`')
    else:
        console.print(f"[yellow]refused: the report and the refused bundle are in {publication.folder}[/yellow]")
    return StepOutcome(specialist, "edge export", True, time.monotonic() - step_started)


def print_summary(
    config: CadreConfig, outcomes: list[StepOutcome], seconds: float, console: Console, since: datetime | None = None
) -> None:
    table = Table(title=f"What ran ({seconds / 60:.1f} min)", title_justify="left")
    for column in ("specialist", "flow", "result", "time"):
        table.add_column(column)
    for outcome in outcomes:
        result = "[green]completed[/green]" if outcome.completed else "[red]failed[/red]"
        table.add_row(outcome.specialist, outcome.flow, result, f"{outcome.seconds:.0f}s")
    console.print(table)
    from cadre.registry.view import print_champions, print_decisions, print_team_table

    if since is not None:
        print_decisions(config, since, console)
    print_champions(config, console)
    if since is not None:
        print_team_table(config, since, console)
    project = config.project
    console.print(
        f"\nWhere to look:\n"
        f"  Prefect UI (schedules, runs): {project.prefect.ui}/deployments\n"
        f"  MLflow UI (runs, registry, gate reports): {project.mlflow.uri}/#/models\n"
        f"  Logs of the services: {config.state_dir / 'logs'}\n"
        f"  Stop everything: cadre down"
    )


def _duplicate(file) -> io.TextIOWrapper | None:
    """A new text stream on a duplicate of `file`'s descriptor, or None when it has none (e.g. a StringIO)."""
    try:
        descriptor = file.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return open(os.dup(descriptor), "w", buffering=1, encoding=getattr(file, "encoding", None) or "utf-8")  # noqa: SIM115
