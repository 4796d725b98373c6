"""`cadre serve`: the team of specialists behind one OpenAI-compatible HTTP API, learning from its users.

    cadre serve                      # http://127.0.0.1:8000/v1, every specialist of pipelines.yaml, plus `auto`
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "icd10-coder", "messages": [{"role": "user", "content": "typhoid endocarditis"}]}'
    curl -s localhost:8000/v1/feedback -H 'content-type: application/json' \\
         -d '{"response_id": "chatcmpl-…", "rating": -1, "correction": "A01.02"}'

Each specialist answers with its champions: the `program` champion's JSON (else the declared program),
the live index, and the `adapter` champion's LoRA GGUF (else the base model), all on one llama.cpp
copy of the base model per base model (`cadre.serving.engine`). A watcher polls the registry and swaps
new champions in without a restart (`cadre.serving.team`). Every response is recorded in the feedback
store so that `POST /v1/feedback` can rate and correct it, and the learn-from-feedback flow can learn
from the corrections. `model: auto` is routed by `cadre.router`.

Settings come from `project.serving` in pipelines.yaml (`cadre.config.project.ServingSettings`, the one
declaration of them: host, port, contexts, polling, routing and request limits), overridden by the command
line (`cadre serve --help`); an API key, when wanted, from the environment variable named by `api_key_env` (default
`CADRE_API_KEY`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cadre.config import CadreConfig
from cadre.config.project import ServingSettings
from cadre.runtime.base_model import base_gguf

log = logging.getLogger("cadre.serve")


class ServeError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


def build_state(
    config: CadreConfig, settings: ServingSettings, n_threads: int | None = None, n_ctx: int | None = None
) -> Any:
    """Load the base models, every specialist's champions, the router and the feedback stores; start nothing yet.

    Args:
        config: the validated pipelines file.
        settings: `project.serving`, with the command line's overrides applied.
        n_threads: decode threads per context (None: `project.lm.n_threads`).
        n_ctx: context window in tokens (None: `project.lm.n_ctx`).

    Returns:
        The `cadre.serving.app.ServingState`.

    Raises:
        ServeError: the registry is unreachable, or the route fallback is not a specialist.
    """
    from cadre.feedback.store import open_store, store_url_for
    from cadre.serving.app import ServingState
    from cadre.serving.engine import LoraEngine
    from cadre.serving.router import Router, RouterSettings
    from cadre.serving.team import (
        ChampionWatcher,
        RegistrySource,
        Team,
        build_runtime,
        current_versions,
    )

    lm = config.project.lm
    n_threads = n_threads or lm.n_threads
    n_ctx = n_ctx or lm.n_ctx
    engines: dict[Path, Any] = {}
    engine_of: dict[str, Any] = {}
    for specialist in config.specialists:
        gguf = base_gguf(config, specialist.base_model)
        if gguf not in engines:
            started = time.perf_counter()
            engines[gguf] = LoraEngine(gguf, contexts=settings.contexts, n_threads=n_threads, n_ctx=n_ctx)
            log.info("loaded %s in %d context(s) (%.1f s)", gguf.name, settings.contexts, time.perf_counter() - started)
        engine_of[specialist.name] = engines[gguf]

    source = RegistrySource(config.project.mlflow.uri, config.project.name, str(config.state_dir))
    retrieves = {s.name: bool(s.program.retrieve_k) for s in config.specialists}
    team = Team([s.name for s in config.specialists])

    def resolve(name: str):
        return current_versions(source, name, retrieves[name])

    def build(name: str, versions):
        return build_runtime(config, name, versions, engine_of[name], source)

    for name in team.names:
        try:
            resolve(name)
        except Exception as error:  # noqa: BLE001 - any failure here means the registry cannot be read
            raise ServeError(
                f"cannot read the champions of {name!r} from MLflow at {source.tracking_uri}: {error}. "
                "Start the stack with `cadre up` (or set project.mlflow.tracking_uri)"
            ) from None
    watcher = ChampionWatcher(team, resolve, build, settings.poll_interval_s)
    watcher.poll()

    router = None
    if settings.route:
        from cadre.knowledge.embedding import Embedder
        from cadre.serving.router import DEFAULT_MARGIN, DEFAULT_THRESHOLD

        embedder = Embedder.load(config.project.embedding, config.project.threads, root=config.root)
        try:
            router = Router.from_specialists(
                config.specialists,
                embedder.embed,
                RouterSettings(
                    threshold=DEFAULT_THRESHOLD if settings.route_threshold is None else settings.route_threshold,
                    margin=DEFAULT_MARGIN if settings.route_margin is None else settings.route_margin,
                    fallback=settings.route_fallback,
                ),
            )
        except ValueError as error:
            raise ServeError(f"router: {error}") from None
    stores = {s.name: open_store(store_url_for(config, s.name)) for s in config.specialists}
    api_key = os.environ.get(settings.api_key_env) or None
    return ServingState(
        team=team,
        engines=list(engines.values()),
        stores=stores,
        limits=settings,
        router=router,
        api_key=api_key,
        descriptions={s.name: " ".join(s.description.split()) for s in config.specialists},
        watcher=watcher,
    )


def create_server_app(
    config: CadreConfig, settings: ServingSettings, n_threads: int | None = None, n_ctx: int | None = None
) -> Any:
    """The FastAPI app with everything loaded and the champion watcher running (stopped at shutdown)."""
    from cadre.serving.app import create_app

    state = build_state(config, settings, n_threads, n_ctx)
    app = create_app(state, on_shutdown=lambda: _shut_down(state))
    state.watcher.start()
    return app


def _shut_down(state: Any) -> None:
    """Stop the champion watcher (a bundle has none), release the team's adapters and free the engines."""
    if state.watcher is not None:
        state.watcher.stop()
    state.team.close()
    for engine in state.engines:
        engine.close()


def run_server(
    config: CadreConfig,
    settings: ServingSettings,
    n_threads: int | None = None,
    n_ctx: int | None = None,
    console: Any = None,
) -> int:
    """Load the team and serve until interrupted (SIGINT/SIGTERM stop it cleanly); arguments as `build_state`."""
    _log_to_stderr()
    started = time.perf_counter()
    app = create_server_app(config, settings, n_threads, n_ctx)
    state = app.state.cadre
    if console is not None:
        for name in state.team.names:
            entry = state.team.entry(name)
            versions = getattr(entry, "versions", None)
            what = (
                ", ".join(f"{k} {v}" for k, v in versions.describe().items())
                if versions
                else f"[yellow]unavailable: {entry.reason}[/yellow]"
            )
            console.print(f"[green]✓[/green] {name}: {what}")
        key = "required (" + settings.api_key_env + ")" if state.api_key else "not required"
        console.print(
            f"serving at http://{settings.host}:{settings.port}/v1 (API key {key}; champions checked every "
            f"{settings.poll_interval_s:g} s; ready in {time.perf_counter() - started:.1f} s)"
        )
    _run(app, settings)
    return 0


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(app: Any, settings: ServingSettings) -> None:
    import uvicorn

    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="info", access_log=False, timeout_graceful_shutdown=10
    )


def bundle_state(folder: Path, settings: ServingSettings, n_threads: int = 1, feedback_url: str | None = None) -> Any:
    """The serving state of one exported bundle: its specialist, answering from the bundle's files only.

    No registry is read and nothing is watched (a bundle is fixed); responses and feedback go to a SQLite file beside
    the bundle (`<bundle>.feedback.db`) unless `feedback_url` names another store.

    Raises:
        cadre.edge.BundleError: the bundle is incomplete, changed, or of an unknown format.
    """
    from cadre.edge.runner import Bundle
    from cadre.feedback.store import open_store
    from cadre.serving.app import ServingState
    from cadre.serving.team import Team

    bundle = Bundle.open(folder, n_threads=n_threads)
    name = bundle.manifest["specialist"]
    team = Team([name])
    team.install(name, bundle.runtime)
    folder = Path(folder).resolve()
    url = feedback_url or f"sqlite:///{folder.with_name(folder.name + '.feedback.db')}"
    return ServingState(
        team=team,
        engines=[bundle.runtime.engine],
        stores={name: open_store(url)},
        limits=settings.model_copy(update={"route": False}),
        api_key=os.environ.get(settings.api_key_env) or None,
        descriptions={name: f"the exported bundle {folder.name}"},
    )


def run_bundle_server(folder: Path, settings: ServingSettings, n_threads: int = 1, console: Any = None) -> int:
    """`cadre serve --bundle DIR`: the bundle's specialist behind the same API as `cadre serve`, until interrupted."""
    from cadre.serving.app import create_app

    _log_to_stderr()
    started = time.perf_counter()
    state = bundle_state(folder, settings, n_threads)
    app = create_app(state, on_shutdown=lambda: _shut_down(state))
    if console is not None:
        name = state.team.names[0]
        versions = ", ".join(f"{k} {v}" for k, v in state.team.entry(name).versions.describe().items())
        console.print(f"[green]✓[/green] {name} from the bundle {folder}: {versions}")
        console.print(
            f"serving at http://{settings.host}:{settings.port}/v1 (ready in {time.perf_counter() - started:.1f} s)"
        )
    _run(app, settings)
    return 0
