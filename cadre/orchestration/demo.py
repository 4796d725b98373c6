"""The main job (`cadre demo`): bring the stack up, prepare models, deploy, run the team's full cycle.

Each flow runs through its Prefect deployment (so it shows in the Prefect UI exactly like a
scheduled run) in the order the loop needs, the order of the stage table (`cadre.stages.SCHEDULED`):
re-index → optimize prompts → refresh adapter → learn from feedback, then the specialist's champions are
exported as an offline bundle and judged beside the server (`cadre.edge.judge`). The job ends with a summary a
person can act on: what ran, how it ended, what was promoted or refused and why, and where to look.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

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


def run_demo(config: CadreConfig, budget: str = "smoke", console: Console | None = None) -> bool:
    """Run the whole main job; returns True when every step completed."""
    console = console or Console(stderr=True)
    started, started_at = time.monotonic(), datetime.now(UTC)
    console.rule("[bold]Cadre[/bold] — the demo team's full cycle")
    prepare_models(config, console=console)
    stack = Stack(config)
    stack.up(console=console)
    crash_orphaned_runs(config, console)
    deploy_all(config, console=console)
    outcomes: list[StepOutcome] = []
    for specialist in config.specialists:
        for kind in SCHEDULED:
            console.rule(f"{kind} · {specialist.name} · budget {budget}")
            step_started = time.monotonic()
            # The cycle runs optimize right after re-index and embedder itself, so they must not queue another.
            extra = {"trigger_optimize": False} if kind in ("reindex", "embedder") else None
            completed = run_now(config, kind, specialist.name, budget=budget, console=console, parameters=extra)
            if kind == "reindex" and completed and specialist.sources and not _has_live_index(config, specialist.name):
                console.print(
                    "[yellow]the re-index ended without a live index (it stopped at the budget's wall-time cap "
                    "before its build was complete, or its gates refused the first version)[/yellow]"
                )
                completed = False
            outcomes.append(StepOutcome(specialist.name, kind, completed, time.monotonic() - step_started))
            if not completed and kind == "reindex":
                console.print(
                    "[yellow]re-index failed: skipping the later flows of this specialist (they would search a stale "
                    "or missing index)[/yellow]"
                )
                break
        outcomes.append(export_bundle_step(config, specialist.name, console))
    print_summary(config, outcomes, time.monotonic() - started, console, since=started_at)
    return all(o.completed for o in outcomes)


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
