"""Tables of what the MLflow registry holds, for `cadre status` and `cadre history`.

Reads the MLflow server named by `pipelines.yaml` (`project.mlflow.uri`) through `cadre.registry.versions`;
writes nothing. Each function takes the validated config and a rich console, so the CLI only parses
arguments and calls them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from rich.console import Console
from rich.table import Table

from cadre.config import CadreConfig, Specialist
from cadre.evaluation.results import mlflow_metric_name
from cadre.registry.runs import ui_url
from cadre.registry.versions import (
    ChampionInfo,
    PromotionRecord,
    champions,
    history,
)
from cadre.stages import REGISTRY_KINDS


def registry_client(config: CadreConfig) -> MlflowClient:
    """An MLflow client of the project's tracking server, which is also its model registry."""
    uri = config.project.mlflow.uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def print_champions(config: CadreConfig, console: Console) -> None:
    """Print each specialist's champion per artifact kind: version, when promoted, key metric.

    Args:
        config: the validated pipelines file.
        console: where to print.
    """
    client = registry_client(config)
    table = Table(title=f"Champions in {config.project.mlflow.uri}", title_justify="left")
    for column in ("specialist", "kind", "version", "promoted", "by", "key metric", "run"):
        table.add_column(column, no_wrap=column in ("version", "run"))
    for specialist in config.specialists:
        events = history(client, config.project.name, specialist.name)
        found = champions(client, config.project.name, specialist.name, events)
        for kind in REGISTRY_KINDS:
            info = found.get(kind)
            if info is not None:
                outside = alias_outside_history(events, kind, info.version)
                table.add_row(
                    specialist.name,
                    kind,
                    f"v{info.version}" + (" [red]⚠[/red]" if outside else ""),
                    f"[red]{outside}[/red]" if outside else _when(info.promoted_at),
                    info.promoted_by or "",
                    _key_metric(info, _gate_metrics(specialist, kind)),
                    (info.run_id or "")[:12],
                )
            elif kind != "index" or specialist.sources:
                table.add_row(
                    specialist.name,
                    kind,
                    "—",
                    f"[dim]none: {WITHOUT_A_CHAMPION.get(kind, 'nothing of this kind serves')}[/dim]",
                    "",
                    _last_event(events, kind),
                    "",
                )
    console.print(table)


def champions_json(config: CadreConfig) -> dict[str, dict[str, dict | None]]:
    """`cadre status --json`'s champions: per specialist and kind, the champion version and how it got there (None:
    no champion of that kind)."""
    client = registry_client(config)
    found: dict[str, dict[str, dict | None]] = {}
    for specialist in config.specialists:
        events = history(client, config.project.name, specialist.name)
        current = champions(client, config.project.name, specialist.name, events)
        found[specialist.name] = {}
        for kind in REGISTRY_KINDS:
            info = current.get(kind)
            found[specialist.name][kind] = (
                None
                if info is None
                else {
                    "model": info.model_name,
                    "version": info.version,
                    "promoted_at": info.promoted_at.isoformat() if info.promoted_at else None,
                    "promoted_by": info.promoted_by,
                    "alias_moved_outside_cadre": alias_outside_history(events, kind, info.version) is not None,
                    "metrics": info.metrics,
                    "run_id": info.run_id,
                }
            )
    return found


SCORE_TABLE = "evaluation/summary.md"
"""The optimize flow's test-split table (retrieval only, declared program, champion, candidate; 95 % intervals)."""


def _finished_optimize_runs(client: MlflowClient, config: CadreConfig, specialist: str) -> list:
    """The specialist's last few finished optimize runs, newest first (empty when it has no experiment)."""
    from cadre.registry.runs import TAG_FLOW, experiment_name

    experiment = client.get_experiment_by_name(experiment_name(config, specialist))
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{TAG_FLOW} = 'optimize' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5,
    )


def print_latest_tables(config: CadreConfig, console: Console) -> None:
    """Print, per specialist, the test-split table of its latest finished optimize run: what retrieval alone, the
    declared program, the champion and the last candidate score on the same cases, so `cadre status` tells whether
    the specialist beats its retriever. Nothing is printed for a specialist that never finished an optimize run."""
    from rich.markdown import Markdown

    from cadre.registry.runs import TAG_VERDICT

    client = registry_client(config)
    for specialist in config.specialists:
        for run in _finished_optimize_runs(client, config, specialist.name):
            try:
                text = client.download_artifacts(run.info.run_id, SCORE_TABLE)
            except Exception:  # noqa: BLE001 - a run that logged no table (stopped early): try the one before
                continue
            table = Path(text).read_text(encoding="utf-8").split("\n\nCompile:")[0]
            verdict = run.data.tags.get(TAG_VERDICT, "no verdict")
            when = _when(datetime.fromtimestamp(run.info.start_time / 1000, UTC))
            console.print(
                f"\n[bold]{specialist.name}[/bold]: latest optimize run {run.info.run_id[:12]} ({when}, {verdict}) — "
                + ui_url(config.project.mlflow.uri, f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
            )
            console.print(Markdown(table))
            break


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except Exception:  # noqa: BLE001 - a deleted run: the version's own tag still has the score
        return {}


def _score(metrics: dict[str, float], key: str) -> str:
    """`0.340 [0.287, 0.397]` from a metric and its interval bounds (`—` when missing)."""
    if key not in metrics:
        return "—"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def print_team_table(config: CadreConfig, since: datetime, console: Console) -> None:
    """One row per specialist: its retrieval-only baseline and what serves, each on the test split with its 95 %
    interval, and what each registry kind's gate decided since `since` (the demo cycle's start).

    Both scores come from the runs that measured them: the baseline and the program from the latest finished
    optimize run (the retriever's first hit answered; the program that served then, or the candidate it promoted),
    an adapter champion from the run that promoted it (measured serving with the program).
    """
    from cadre.registry.versions import EVENT_REFUSAL

    client = registry_client(config)
    table = Table(title="The team after this cycle (test split, 95 % intervals)", title_justify="left")
    for column in ("specialist", "metric", "baseline: retrieval only", "serving now", *REGISTRY_KINDS):
        table.add_column(column, overflow="fold")
    for specialist in config.specialists:
        metric = mlflow_metric_name(specialist.evaluation.answer_metrics[0])
        events = history(client, config.project.name, specialist.name)
        current = champions(client, config.project.name, specialist.name, events)
        # The latest optimize run that evaluated on test (one stopped early has no candidate scores).
        optimize = next(
            (
                r
                for r in _finished_optimize_runs(client, config, specialist.name)
                if "candidate_cases" in r.data.metrics
            ),
            None,
        )
        measured = dict(optimize.data.metrics) if optimize else {}
        program, adapter = current.get("program"), current.get("adapter")
        if adapter is not None:
            serving = f"adapter v{adapter.version}: " + _score(
                _prefixed(_run_metrics(client, adapter.run_id), "candidate_") or adapter.metrics, metric
            )
        elif optimize is None:
            serving = "declared program (never evaluated)"
        else:
            promoted_here = program is not None and program.run_id == optimize.info.run_id
            name = f"program v{program.version}" if program else "declared program"
            serving = f"{name}: " + _score(_prefixed(measured, "candidate_" if promoted_here else "baseline_"), metric)
        decided = []
        for kind in REGISTRY_KINDS:
            recent = [e for e in events if e.kind == kind and e.at is not None and e.at >= since]
            if recent:
                last = recent[-1]
                word = "refused" if last.event == EVENT_REFUSAL else last.event.replace("promotion", "promoted")
                decided.append(f"{word} v{last.version}")
            else:
                info = current.get(kind)
                decided.append(f"kept v{info.version}" if info else "—")
        baseline = _score(_prefixed(measured, "retrieval_only_"), metric)
        before = _prefixed(measured, "retrieval_configured_")  # the configured embedder's version, where refreshed
        if metric in before:
            baseline = f"{baseline} ({_score(before, metric)} before the embedder refresh)"
        table.add_row(specialist.name, metric, baseline, serving, *decided)
    console.print(table)


# What answers when a kind has no champion, as `cadre serve` and the flows behave.
WITHOUT_A_CHAMPION = {
    "index": "no retrieval until an index is promoted",
    "embedder": "the configured embedding model (project.embedding) embeds",
    "program": "the declared program serves",
    "adapter": "the base model serves",
}


def alias_outside_history(events: list[PromotionRecord], kind: str, champion: str) -> str | None:
    """Why `champion` is not the champion Cadre's history installed for `kind`, or None when it is.

    MLflow's own "Promote model" and alias buttons move `champion` without a gate and without a history run; the
    last applied event (promotion, rollback, retirement, or a refusal, which keeps the champion it found) says
    where Cadre left the alias.
    """
    mine = [record for record in events if record.kind == kind and record.outcome == "applied"]
    expected = mine[-1].to_version if mine else None
    if expected == champion:
        return None
    where = f"v{expected}" if expected else "no champion"
    fix = f"`cadre rollback` restores v{expected}" if expected else "`cadre retire` removes it"
    return f"alias moved outside Cadre (no gate, no history): Cadre left {where}; {fix}"


def _last_event(events: list[PromotionRecord], kind: str) -> str:
    """`last: v3 refused 2026-… (why)` for a kind without a champion, or that nothing was decided yet."""
    mine = [record for record in events if record.kind == kind]
    if not mine:
        return "[dim]no candidate yet[/dim]"
    last = mine[-1]
    done = {"promotion": "promoted", "refusal": "refused", "rollback": "rolled back", "retirement": "retired"}.get(
        last.event, last.event
    )
    return f"last: v{last.version} {done} {_when(last.at)}" + (f": {last.reason}" if last.reason else "")


def print_history(config: CadreConfig, specialist: str, kind: str | None, console: Console) -> None:
    """Print a specialist's promotions, refusals and rollbacks, oldest first.

    Args:
        config: the validated pipelines file.
        specialist: specialist name (must exist in the config).
        kind: only this artifact kind, or None for all.
        console: where to print.

    Raises:
        KeyError: no such specialist.
    """
    settings = config.specialist(specialist)
    client = registry_client(config)
    records = history(client, config.project.name, specialist, kind)
    title = f"History of {specialist}" + (f" ({kind})" if kind else "")
    if not records:
        console.print(f"{title}: nothing promoted, refused or rolled back yet.")
        return
    console.print(history_table(title, records, settings))


def history_table(title: str, records: list[PromotionRecord], settings: Specialist) -> Table:
    """The history as a table whose short columns (`#`, `when`, `version`, `champion`, `by`) are never cut or folded:
    the metrics and the reason wrap instead, down to the 160 columns of a pipe."""
    table = Table(title=title, title_justify="left")
    whole = ("#", "when", "event", "kind", "version", "champion", "gate", "by")
    widest_actor = max((len(record.actor) for record in records), default=2)
    for column in ("#", "when", "event", "kind", "version", "champion", "gate", "metrics", "by", "reason"):
        table.add_column(
            column,
            no_wrap=column in whole,
            min_width=min(widest_actor, 48) if column == "by" else None,
            ratio=1 if column in ("metrics", "reason") else None,
            overflow="fold",
        )
    for record in records:
        table.add_row(
            str(record.seq),
            _when(record.at),
            _event(record),
            record.kind,
            f"v{record.version}",
            f"{_v(record.from_version)} → {_v(record.to_version)}",
            record.gate or "—",
            _metrics(record.metrics, _gate_metrics(settings, record.kind)),
            record.actor,
            record.reason or "",
        )
    return table


def print_decisions(config: CadreConfig, since: datetime, console: Console) -> int:
    """Print what the gates decided since a moment: each promotion or refusal, why, and where its report is.

    Args:
        config: the validated pipelines file.
        since: only events at or after this moment (timezone-aware).
        console: where to print.

    Returns:
        How many decisions were printed.
    """
    client = registry_client(config)
    table = Table(title="What the gates decided", title_justify="left")
    for column in ("specialist", "kind", "version", "decision", "why", "gate report (MLflow UI)"):
        table.add_column(column, no_wrap=column in ("version", "decision"), overflow="fold")
    count = 0
    for specialist in config.specialists:
        for record in history(client, config.project.name, specialist.name):
            if record.at is None or record.at < since:
                continue
            table.add_row(
                specialist.name,
                record.kind,
                f"v{record.version}",
                _event(record),
                record.reason or record.gate or "—",
                version_url(config, record.model_name, record.version),
            )
            count += 1
    if count:
        console.print(table)
    else:
        console.print("The gates decided nothing in this cycle (no flow produced a candidate).")
    return count


def version_url(config: CadreConfig, model_name: str, version: str) -> str:
    """The MLflow UI page of a registered model version (its description is the gate report)."""
    return ui_url(config.project.mlflow.uri, f"models/{model_name}/versions/{version}")


def describe_record(record: PromotionRecord) -> str:
    """One line for the CLI after `promote` / `rollback` / `retire`: what happened to which champion, by whom, why."""
    forced = " (forced)" if record.forced else ""
    reason = f": {record.reason}" if record.reason else ""
    return (
        f"{record.event}{forced} of {record.model_name} v{record.version}: champion "
        f"{_v(record.from_version)} → {_v(record.to_version)}, by {record.actor} at {_when(record.at)}{reason}"
    )


def _gate_metrics(specialist: Specialist, kind: str) -> list[str]:
    """The metrics the kind's gates read, in rule order: the numbers a reviewer looks at first. Without rules,
    the specialist's retrieval metrics (index) or answer metrics (program, adapter)."""
    rules = getattr(specialist.gates, kind, [])
    retrieval = kind in ("index", "embedder")
    fallback = specialist.evaluation.retrieval_metrics if retrieval else specialist.evaluation.answer_metrics
    return list(dict.fromkeys([rule.metric for rule in rules] or fallback))


def _key_metric(info: ChampionInfo, preferred: list[str]) -> str:
    for name in preferred:
        if name in info.metrics:
            return f"{name} = {info.metrics[name]:.3g}"
    if info.metrics:
        name = min(info.metrics)
        return f"{name} = {info.metrics[name]:.3g}"
    return "—"


def _metrics(metrics: dict[str, float], preferred: list[str]) -> str:
    names = [n for n in preferred if n in metrics] or sorted(metrics)[:3]
    return ", ".join(f"{n} = {metrics[n]:.3g}" for n in names) or "—"


def _event(record: PromotionRecord) -> str:
    style = {"promotion": "green", "refusal": "yellow", "rollback": "magenta", "retirement": "red"}.get(
        record.event, ""
    )
    text = record.event + (" (forced)" if record.forced else "")
    return f"[{style}]{text}[/{style}]" if style else text


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
