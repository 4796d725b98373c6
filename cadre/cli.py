"""The `cadre` command line: parses arguments and calls into the core or the flows.

Run `cadre --help` for the list of commands. Every command reads `pipelines.yaml` from the current
folder unless `--config FILE` (or $CADRE_CONFIG) names another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from cadre.config import ConfigError, load_config
from cadre.platform.env import apply_env, ensure_state_dir
from cadre.platform.stack import require_services
from cadre.stages import REGISTRY_KINDS, STAGE_BY_NAME

# Piped into a log or a CI job there is no terminal to measure and rich would assume 80 columns, which
# folds the history and champion tables into unreadable slivers; a terminal (or COLUMNS) sets its own width.
console = Console(
    stderr=True,
    highlight=False,
    soft_wrap=True,
    width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 160,
)
EXIT_INVALID = 2
EXIT_SERVICES_DOWN = 3  # `cadre status`: a service of the stack is down or unhealthy


def _config_arg(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """`-c/--config FILE` (default $CADRE_CONFIG, else pipelines.yaml); with `positional`, `[FILE]` is accepted too."""
    default = os.environ.get("CADRE_CONFIG", "pipelines.yaml")
    parser.add_argument("-c", "--config", dest="file", default=default, help="pipelines file (default: %(default)s)")
    if positional:
        parser.add_argument("positional_file", nargs="?", metavar="FILE", help="pipelines file (same as -c FILE)")


def _load(file: str, state: bool = True):
    """Validate the file (exit 2 on problems) and point this process at the project's services.

    The environment is set here, before anything imports Prefect: Prefect reads its settings at import.
    With `state`, the project's state directory is made (ignoring itself in git) before anything writes there.
    """
    try:
        config = load_config(file)
    except ConfigError as error:
        for issue in error.issues:
            print(issue.render(str(file)), file=sys.stderr)
        noun = "problem" if len(error.issues) == 1 else "problems"
        console.print(f"[red]{file}: {len(error.issues)} {noun}; nothing was run.[/red]")
        raise SystemExit(EXIT_INVALID) from None
    apply_env(config)
    if state:
        ensure_state_dir(config)
    return config


def cmd_validate(args: argparse.Namespace) -> int:
    from cadre.config.checks import check_config

    started = time.perf_counter()
    file = args.positional_file or args.file
    config = _load(file, state=False)
    findings = check_config(config, deep=args.deep)
    for finding in findings:
        print(finding.render(), file=sys.stderr)
    errors = [f for f in findings if f.severity == "error"]
    took = f"in {1000 * (time.perf_counter() - started):.0f} ms"
    if errors:
        noun = "problem" if len(errors) == 1 else "problems"
        console.print(f"[red]{file}: {len(errors)} {noun} in what it points at; a run would fail on it[/red] ({took})")
        return EXIT_INVALID
    names = ", ".join(s.name for s in config.specialists)
    warned = f", {len(findings)} warning(s)" if findings else ""
    console.print(
        f"[green]{file} is valid[/green]: {len(config.specialists)} specialist(s) ({names}){warned} {took}"
        + ("" if args.deep else "; `--deep` also reads python and sql sources")
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cadre.config import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        console.print(f"wrote {args.output}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from cadre.platform.stack import Stack

    config = _load(args.file)
    stack = Stack(config)
    stack.up(services=args.only or None, console=console)
    if not args.only or "worker" in args.only:
        from cadre.orchestration.deployments import crash_orphaned_runs

        crash_orphaned_runs(config, console)
    stack.print_status(console)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cadre.orchestration.deployments import STOP_GRACE_S, end_flow_runs
    from cadre.platform.stack import Stack

    config = _load(args.file)
    stack = Stack(config)
    grace = STOP_GRACE_S if args.grace is None else args.grace
    if not grace >= 0:
        console.print(f"[red]--grace must be a number of seconds, 0 or more; got {args.grace}[/red]")
        return 2
    end_flow_runs(config, stack.worker_pid(), wait=args.wait, grace_s=grace, console=console)
    stack.down(console=console)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cadre.platform.stack import Stack, all_up

    config = _load(args.file)
    stack = Stack(config)
    if args.json:
        rows = stack.status()
        healthy = all_up(rows)
        report: dict = {"healthy": healthy, "services": rows}
        if healthy:
            from cadre.registry.view import champions_json

            report["champions"] = champions_json(config)
        print(json.dumps(report, indent=1, default=str))
    else:
        healthy = stack.print_status(console)
        if healthy:
            from cadre.orchestration.deployments import print_schedules
            from cadre.registry.view import print_champions, print_latest_tables

            print_schedules(config, console)
            print_champions(config, console)
            print_latest_tables(config, console)
        else:
            console.print(
                f"[red]a service is down[/red]: start the stack with `cadre up` (service logs: {stack.log_dir})"
            )
    return 0 if healthy else EXIT_SERVICES_DOWN


def cmd_models(args: argparse.Namespace) -> int:
    from cadre.runtime.base_model import prepare_models

    prepare_models(_load(args.file), console=console)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from cadre.orchestration.deployments import deploy_all

    config = _load(args.file)
    require_services(config, "prefect")
    deploy_all(config, console=console, paused=args.paused)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from cadre.orchestration.deployments import CancelError, cancel_runs

    config = _load(args.file)
    _specialist_or_exit(config, args.specialist)
    require_services(config, "prefect")
    try:
        cancel_runs(config, args.target, args.specialist, console=console)
    except CancelError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from cadre.orchestration.deployments import run_worker

    return run_worker(_load(args.file))


def cmd_run(args: argparse.Namespace) -> int:
    from cadre.orchestration.deployments import run_now

    config = _load(args.file)
    names = [args.specialist] if args.specialist else [s.name for s in config.specialists]
    ok = True
    for name in names:
        try:
            config.specialist(name)
        except KeyError as error:
            console.print(f"[red]{error.args[0]}[/red]")
            return EXIT_INVALID
    require_services(config, "prefect", "mlflow")
    reports: list[dict] = []
    for name in names:
        reports.append({})
        ok &= run_now(
            config,
            args.flow,
            name,
            budget=args.budget,
            console=console,
            follow_existing=not args.new,
            report=reports[-1],
        )
    if args.json:
        print(json.dumps(reports, indent=1, default=str))
    return 0 if ok else 1


def _specialist_or_exit(config, name: str):
    try:
        return config.specialist(name)
    except KeyError as error:
        console.print(f"[red]{error.args[0]}[/red]")
        raise SystemExit(EXIT_INVALID) from None


def cmd_history(args: argparse.Namespace) -> int:
    from cadre.registry.view import print_history

    config = _load(args.file)
    _specialist_or_exit(config, args.specialist)
    require_services(config, "mlflow")
    if args.json:
        import dataclasses

        from cadre.registry.versions import history
        from cadre.registry.view import registry_client

        records = history(registry_client(config), config.project.name, args.specialist, args.kind)
        rows = [dataclasses.asdict(record) | {"at": record.at.isoformat()} for record in records]
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print_history(config, args.specialist, args.kind, console)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from cadre.registry.versions import RegistryError, default_actor, promote
    from cadre.registry.view import describe_record, registry_client

    config = _load(args.file)
    _specialist_or_exit(config, args.specialist)
    if args.force and not (args.reason or "").strip():
        console.print('[red]--force needs --reason "why" (it is recorded in the history)[/red]')
        return EXIT_INVALID
    require_services(config, "mlflow")
    try:
        record = promote(
            registry_client(config),
            project=config.project.name,
            specialist=args.specialist,
            kind=args.kind,
            version=args.version,
            actor=args.actor or default_actor(),
            force=args.force,
            reason=args.reason,
        )
    except RegistryError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    console.print(describe_record(record))
    _follow_specialist(config, args.specialist, record)
    return 0


def _follow_specialist(config: Any, specialist: str, record: Any) -> None:
    """A champion moved by hand: the specialist's one-model version follows (`cadre.registry.models`)."""
    from cadre.registry.models import register_specialist

    try:
        version = register_specialist(
            config,
            specialist,
            record.history_run_id,
            actor=record.actor,
            reason=f"Follows the {record.event} of {record.model_name} v{record.version}.",
        )
    except Exception as error:  # noqa: BLE001 - the champion moved; say what did not follow, and how to redo it
        console.print(
            f"[yellow]the specialist model {config.project.name}.{specialist} was not updated: {error}; "
            "the next promotion of any part registers it[/yellow]"
        )
        return
    if version is not None:
        console.print(f"{version.name} v{version.version} is the specialist model's champion now (its current parts)")


def cmd_rollback(args: argparse.Namespace) -> int:
    from cadre.registry.versions import rollback

    return _move_champion(args, rollback)


def cmd_retire(args: argparse.Namespace) -> int:
    from cadre.registry.versions import retire

    return _move_champion(args, retire)


def _move_champion(args: argparse.Namespace, operation: Any) -> int:
    """Run a registry operation that moves a specialist's champion (`rollback`, `retire`) and print the recorded event."""
    from cadre.registry.versions import RegistryError, default_actor
    from cadre.registry.view import describe_record, registry_client

    config = _load(args.file)
    _specialist_or_exit(config, args.specialist)
    require_services(config, "mlflow")
    try:
        record = operation(
            registry_client(config),
            config.project.name,
            args.specialist,
            args.kind,
            actor=args.actor or default_actor(),
            reason=args.reason,
        )
    except RegistryError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    console.print(describe_record(record))
    _follow_specialist(config, args.specialist, record)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cadre.orchestration.demo import run_demo

    return 0 if run_demo(_load(args.file), budget=args.budget, console=console, parallel=args.parallel) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from cadre.serving.server import ServeError, run_server

    if args.bundle:
        return _serve_bundle(args)
    config = _load(args.file)
    # `project.serving` from pipelines.yaml, each flag given on the command line overriding its field.
    overrides = _serving_flags(
        args,
        contexts=args.contexts,
        poll_interval_s=args.poll_interval,
        route_threshold=args.route_threshold,
        route_margin=args.route_margin,
        route_fallback=args.route_fallback,
    )
    if args.no_route:
        overrides["route"] = False
    settings = config.project.serving.model_copy(update=overrides)

    if args.route_fallback:
        _specialist_or_exit(config, args.route_fallback)
    require_services(config, "mlflow")  # the champions to serve are read from its registry
    try:
        return run_server(config, settings, n_threads=args.threads, n_ctx=args.n_ctx, console=console)
    except ServeError as error:
        console.print(f"[red]{error}[/red]")
        return 1


_SERVING_FLAGS = (
    "host",
    "port",
    "api_key_env",
    "max_in_flight",
    "max_body_bytes",
    "max_input_chars",
    "max_prompt_tokens",
    "max_tokens",
)
"""`cadre serve` flags named as their `ServingSettings` field, for the team and for `--bundle` alike."""


def _serving_flags(args: argparse.Namespace, **team: Any) -> dict[str, Any]:
    """The `ServingSettings` fields given on `cadre serve`'s command line: `_SERVING_FLAGS`, and the team's own
    settings passed as `team` (what `--bundle` has no use for); flags left out are not included."""
    flags = {name: getattr(args, name) for name in _SERVING_FLAGS} | team
    return {name: value for name, value in flags.items() if value is not None}


def _serve_bundle(args: argparse.Namespace) -> int:
    """`cadre serve --bundle DIR`: no pipelines.yaml, no registry; the request limits are the defaults or the flags."""
    from cadre.config.project import ServingSettings
    from cadre.edge import BundleError
    from cadre.serving.server import run_bundle_server

    settings = ServingSettings().model_copy(update=_serving_flags(args))
    try:
        return run_bundle_server(Path(args.bundle), settings, n_threads=args.threads or 1, console=console)
    except BundleError as error:
        console.print(f"[red]{error}[/red]")
        return 1


def cmd_export(args: argparse.Namespace) -> int:
    from cadre.edge.bundle import BundleError, export_bundle
    from cadre.edge.export import champion_parts
    from cadre.edge.judge import publish_bundle

    config = _load(args.file)
    _specialist_or_exit(config, args.specialist)
    require_services(config, "mlflow")  # the champions to export are read from its registry
    target = Path(args.to) if args.to else config.state_dir / "bundles" / args.specialist
    started = time.perf_counter()
    judgement = None
    try:
        if args.no_judge:
            folder = export_bundle(champion_parts(config, args.specialist), target)
        else:
            cases = args.cases or config.specialist(args.specialist).edge.cases
            console.print(
                f"exporting {args.specialist}, then answering {cases} test cases beside the served champion …"
            )
            publication = publish_bundle(config, args.specialist, target, cases=args.cases)
            folder, judgement = publication.folder, publication.judgement
    except (BundleError, ValueError) as error:
        console.print(f"[red]{error}[/red]")
        return 1
    manifest = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    lineage = manifest["lineage"]
    parts = ", ".join(
        f"{kind} {'v' + lineage[kind] if lineage.get(kind) else default}"
        for kind, default in (("program", "declared"), ("adapter", "none (base model)"), ("index", "none"))
    )
    summary = (
        f"{manifest['bytes'] / 1e6:.0f} MB in {len(manifest['files'])} files ({parts}; index version "
        f"{lineage.get('index_version') or 'none'}) in {time.perf_counter() - started:.0f} s"
    )
    if judgement is not None:
        console.print(Markdown(judgement.to_markdown()))
    if judgement is not None and not judgement.passed:
        console.print(
            f"[red]refused: the bundle was not published[/red] ({target} is unchanged); the refused bundle and its "
            f"report are in {folder}: {summary}"
        )
        return 1
    console.print(f"[green]exported {args.specialist}[/green] to {folder}: {summary}")
    console.print(f'answer with: cadre answer --bundle {folder} "…"')
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from cadre.edge import Bundle, BundleError

    started = time.perf_counter()
    try:
        bundle = Bundle.open(args.bundle, n_threads=args.threads)
    except BundleError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    names = bundle.input_names
    if args.json is not None:
        try:
            inputs = json.loads(args.json)
        except ValueError as error:
            console.print(f"[red]--json is not valid JSON: {error}[/red]")
            return EXIT_INVALID
        if not isinstance(inputs, dict):
            console.print(f"[red]--json must be an object with the fields {', '.join(names)}[/red]")
            return EXIT_INVALID
    elif args.text is not None and len(names) == 1:
        inputs = {names[0]: args.text}
    else:
        console.print(
            f"[red]this program has the input fields {', '.join(names)}: give --json '{{\"{names[0]}\": …}}'[/red]"
            if len(names) > 1
            else f"[red]give the {names[0]} to answer[/red]"
        )
        return EXIT_INVALID
    try:
        asked = time.perf_counter()
        result = bundle.answer(inputs)
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        return EXIT_INVALID
    answered = time.perf_counter()
    print(result["answer"])
    print("retrieved: " + (" ".join(result["retrieved_ids"]) or "(none)"))
    console.print(
        f"opened in {bundle.opened_in_s:.2f} s (verified and loaded); answered in {answered - asked:.2f} s; "
        f"first answer {answered - started:.2f} s after start",
        style="dim",
    )
    bundle.close()
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    import io
    import logging

    from cadre.feedback.store import open_store, store_url_for
    from cadre.jsonl import write_text_atomic

    config = _load(args.file)
    names = [args.specialist] if args.specialist else [s.name for s in config.specialists]
    for name in names:
        _specialist_or_exit(config, name)
    urls: dict[str, list[str]] = {}
    for name in names:
        urls.setdefault(store_url_for(config, name), []).append(name)
    # Everything is read and serialised first; the file is then replaced in one step (never left half written).
    logging.getLogger("cadre.feedback.store").setLevel(logging.ERROR)  # skipped rows are listed below instead
    buffer = io.StringIO()
    exports = [
        open_store(url).export_jsonl(buffer, specialist=name) for url, members in urls.items() for name in members
    ]
    if args.output == "-":
        sys.stdout.write(buffer.getvalue())
        sys.stdout.flush()
    else:
        write_text_atomic(args.output, buffer.getvalue())
    where = "stdout" if args.output == "-" else args.output
    written = sum(export.written for export in exports)
    skipped = [skip for export in exports for skip in export.skipped]
    console.print(f"wrote {written} feedback record(s) of {', '.join(names)} to {where}")
    if skipped:
        console.print(
            f"[yellow]skipped {len(skipped)} unusable feedback row(s) (stored before the checks, or written into the "
            "database by other means):[/yellow]",
            highlight=False,
        )
        for skip in skipped[:20]:
            console.print(f"  {skip}", markup=False, highlight=False)
        if len(skipped) > 20:
            console.print(f"  … and {len(skipped) - 20} more", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadre", description="Keep a team of specialist small language models fresh.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "validate",
        help="check pipelines.yaml and what it points at (entrypoints, suites, fields); exit 2 listing every problem "
        "with its file and line",
    )
    _config_arg(p, positional=True)
    p.add_argument(
        "--deep", action="store_true", help="also read python and sql sources (and large files) to check relevant_ids"
    )
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("schema", help="write the JSON Schema of pipelines.yaml (for editors)")
    p.add_argument(
        "-o", "--output", default="pipelines.schema.json", help="file to write, or - for stdout (default: %(default)s)"
    )
    p.set_defaults(func=cmd_schema)

    p = commands.add_parser(
        "up",
        help="start the local stack (MLflow, Prefect server + worker, LM server; PostgreSQL with database.backend: "
        "postgres) and wait until healthy",
    )
    _config_arg(p)
    p.add_argument(
        "--only",
        action="append",
        choices=["database", "mlflow", "prefect", "worker", "lm"],
        help="start only this service (repeatable)",
    )
    p.set_defaults(func=cmd_up)

    p = commands.add_parser(
        "down", help="end the flow runs the worker started (cancel, then SIGTERM), then stop what `cadre up` started"
    )
    _config_arg(p)
    p.add_argument("--wait", action="store_true", help="wait for running flow runs to finish instead of ending them")
    p.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="how long a flow run may take to stop after SIGTERM before it is killed (default 20)",
    )
    p.set_defaults(func=cmd_down)

    p = commands.add_parser(
        "status",
        help="health and URLs of the services, and each specialist's champions (exit 3 when a service is down)",
    )
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the services and champions as JSON (for scripts)")
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("models", help="prepare the packaged models once (GGUF, safetensors, embeddings)")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = models.add_parser(
        "prepare", help="assemble the GGUF, convert the base model to safetensors, check the embedding model"
    )
    _config_arg(q)
    q.set_defaults(func=cmd_models)

    p = commands.add_parser(
        "deploy",
        help="create/update a Prefect deployment per specialist and flow; active schedules start running at their "
        "next cron time",
    )
    _config_arg(p)
    p.add_argument(
        "--paused",
        action="store_true",
        help="create every schedule paused (resume them in the Prefect UI); `cadre run` still works",
    )
    p.set_defaults(func=cmd_deploy)

    p = commands.add_parser(
        "cancel", help="cancel a flow run (by name or id) or the unfinished runs of a flow of a specialist"
    )
    _config_arg(p)
    p.add_argument("target", metavar="RUN|FLOW", help=f"a flow run's name or id, or a flow: {', '.join(STAGE_BY_NAME)}")
    p.add_argument("-s", "--specialist", required=True, help="specialist name")
    p.set_defaults(func=cmd_cancel)

    p = commands.add_parser("worker", help="run a Prefect worker that executes the scheduled runs (foreground)")
    _config_arg(p)
    p.set_defaults(func=cmd_worker)

    p = commands.add_parser("run", help="run a flow now, through its Prefect deployment, and wait for it")
    _config_arg(p)
    p.add_argument("flow", choices=list(STAGE_BY_NAME), help="which flow")
    p.add_argument("-s", "--specialist", help="specialist name (default: every specialist)")
    p.add_argument(
        "--budget", choices=["smoke", "full"], default="full", help="smoke: the reduced budget (default: %(default)s)"
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="start a new run even when one of this flow is already queued or running (it waits for that one)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="end by printing each run's flow run, final state, MLflow run, verdict and figures as JSON on stdout",
    )
    p.set_defaults(func=cmd_run)

    kinds = list(REGISTRY_KINDS)
    p = commands.add_parser("history", help="promotions, refusals and rollbacks of a specialist, oldest first")
    _config_arg(p)
    p.add_argument("specialist")
    p.add_argument("kind", nargs="?", choices=kinds, help="only this artifact kind (default: all)")
    p.add_argument("--json", action="store_true", help="print the events as a JSON list (for scripts)")
    p.set_defaults(func=cmd_history)

    p = commands.add_parser(
        "promote", help="make a registered version champion (its gates must have passed unless --force)"
    )
    _config_arg(p)
    p.add_argument("specialist")
    p.add_argument("kind", choices=kinds)
    p.add_argument("version", help="model version number, as the MLflow registry shows it")
    p.add_argument("--force", action="store_true", help="promote although its gates failed (needs --reason)")
    p.add_argument("--reason", help="why; recorded in the history")
    p.add_argument("--actor", help="who is acting (default: user@host)")
    p.set_defaults(func=cmd_promote)

    p = commands.add_parser("rollback", help="restore the previous champion in one step")
    _config_arg(p)
    p.add_argument("specialist")
    p.add_argument("kind", choices=kinds)
    p.add_argument("--reason", help="why; recorded in the history")
    p.add_argument("--actor", help="who is acting (default: user@host)")
    p.set_defaults(func=cmd_rollback)

    p = commands.add_parser(
        "retire", help="stop serving a program or adapter champion (the declared program / base model serves)"
    )
    _config_arg(p)
    p.add_argument("specialist")
    p.add_argument("kind", choices=["program", "adapter"])
    p.add_argument("--reason", help="why; recorded in the history")
    p.add_argument("--actor", help="who is acting (default: user@host)")
    p.set_defaults(func=cmd_retire)

    p = commands.add_parser(
        "serve", help="serve the team behind an OpenAI-compatible API; champions go live without a restart"
    )
    _config_arg(p)
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="serve one exported bundle (`cadre export`) instead of the registry's team: no pipelines.yaml, no stack",
    )
    p.add_argument("--host", help="interface to bind (default: project.serving.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: project.serving.port, 8000)")
    p.add_argument(
        "--contexts",
        type=int,
        help="llama.cpp contexts per base model: generations at once (default: project.serving.contexts)",
    )
    p.add_argument("--threads", type=int, help="decode threads per context (default: project.lm.n_threads)")
    p.add_argument("--n-ctx", type=int, help="context window in tokens (default: project.lm.n_ctx)")
    p.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between checks of the registry's champions (default: project.serving.poll_interval_s)",
    )
    p.add_argument(
        "--api-key-env",
        help="environment variable with the API key; unset: no key (default: project.serving.api_key_env)",
    )
    p.add_argument("--no-route", action="store_true", help="do not serve `model: auto`")
    p.add_argument(
        "--route-threshold", type=float, help="router similarity floor (default: project.serving.route_threshold)"
    )
    p.add_argument(
        "--route-margin", type=float, help="margin over the off-topic profile (default: project.serving.route_margin)"
    )
    p.add_argument(
        "--route-fallback",
        help="specialist answering `auto` requests nothing matches (default: project.serving.route_fallback)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        help="requests admitted at once; more get 429 (default: project.serving.max_in_flight)",
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default: project.serving.max_body_bytes)")
    p.add_argument(
        "--max-input-chars", type=int, help="longest user message (default: project.serving.max_input_chars)"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="longest rendered prompt in tokens (default: project.serving.max_prompt_tokens)",
    )
    p.add_argument(
        "--max-tokens", type=int, help="most tokens a request may generate (default: project.serving.max_tokens)"
    )
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser(
        "export", help="write a specialist's champions as one offline bundle (model, prompt, index, embedder)"
    )
    _config_arg(p)
    p.add_argument("-s", "--specialist", required=True, help="the specialist to export")
    p.add_argument(
        "--to",
        metavar="DIR",
        help="the bundle folder (default: <state_dir>/bundles/<specialist>; replaced only by a bundle that passes)",
    )
    p.add_argument("--cases", type=int, help="test cases answered beside the served champion (default: edge.cases)")
    p.add_argument(
        "--no-judge", action="store_true", help="write the bundle without judging it (no parity check, no rules)"
    )
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("answer", help="answer one case from an exported bundle (no stack, no network)")
    p.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder (`cadre export --to`)")
    p.add_argument("text", nargs="?", help="the value of the program's input field (a program with one input)")
    p.add_argument("--json", help="the input fields as a JSON object (a program with several inputs)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp and embedding threads (default: %(default)s)")
    p.set_defaults(func=cmd_answer)

    p = commands.add_parser("feedback", help="feedback captured by `cadre serve`")
    actions = p.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    q = actions.add_parser("export", help="write ratings and corrections, with the responses they rate, as JSONL")
    _config_arg(q)
    q.add_argument("--specialist", help="only this specialist (default: all)")
    q.add_argument("-o", "--output", default="-", help="file to write, or - for stdout (default: %(default)s)")
    q.set_defaults(func=cmd_feedback_export)

    p = commands.add_parser("demo", help="the main job: bring the stack up, deploy, and run the team's full cycle")
    _config_arg(p)
    p.add_argument("--budget", choices=["smoke", "full"], default="smoke", help="(default: %(default)s)")
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="run at most N specialists' cycles at once (default: all side by side; 1: one after another)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cadre.platform.stack import StackError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as error:
        console.print(f"[red]{error}[/red]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
