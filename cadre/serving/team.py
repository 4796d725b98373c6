"""The team as it serves: each specialist's champion program, live index and champion adapter, swapped live.

A `SpecialistRuntime` is an immutable snapshot of what answers for one specialist: the program (the
registry's `program` champion, else the declared program), the index version that was live when it
was built, and a lease on the `adapter` champion loaded into the engine (else the base model).
`Team` maps names to snapshots; a request takes the snapshot (and a lease on its adapter) once, at
its start, so a swap never changes what an in-flight request runs on.

`ChampionWatcher` polls the registry aliases and the live index pointer every `interval_s`; when a
champion moved it builds the new snapshot completely (downloads, program load, adapter load) and only
then swaps it in. A failure keeps the old snapshot serving and is retried at the next poll; a request
never waits for a load and never fails because of one.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cadre.runtime.lm import answer_from_candidates
from cadre.runtime.prompt import PromptSpec, parse_completion
from cadre.runtime.retrieval import IndexTarget, Passage, Retriever, open_index_search, retrieval_query
from cadre.runtime.serving_prompt import ServingPrompt, read_serving_prompt
from cadre.serving.engine import AdapterLease, Generation, LoraEngine

if TYPE_CHECKING:
    from cadre.config import CadreConfig
    from cadre.config.program import ProgramSettings

log = logging.getLogger("cadre.serve")

DECLARED = "declared"
BASE = "base"
NO_INDEX = "none"


@dataclass(frozen=True)
class ChampionVersions:
    """What the registry and the index say should serve one specialist.

    Attributes:
        program: version of the `program` champion; None: the declared (un-optimized) program.
        adapter: version of the `adapter` champion; None: the base model.
        index: the live index version; None when the program does not retrieve (or nothing is live).
        index_model: the registry version of the `index` champion that is that index version (None: the index
            version comes from the `live.json` of a state dir the registry has no index champion for).
    """

    program: str | None
    adapter: str | None
    index: str | None
    index_model: str | None = None

    def describe(self) -> dict[str, str]:
        """As the API reports them: `declared` program, `base` adapter, `none` index when absent."""
        return {"program": self.program or DECLARED, "index": self.index or NO_INDEX, "adapter": self.adapter or BASE}


class SpecialistUnavailable(RuntimeError):
    """The specialist cannot answer now (e.g. it retrieves and no index is live); the message says why."""


class Rendered(NamedTuple):
    """A request made ready to answer.

    Attributes:
        prompt: what the model reads.
        retrieved_ids: the ids of the passages in it, best-ranked first.
        candidates: what a `constrained` or `score` answer chooses among (the passages' ids or titles, by the
            program's `answer.choose_from`); empty for a free answer.
    """

    prompt: str
    retrieved_ids: list[str]
    candidates: list[str]


@dataclass(frozen=True)
class RequestRenderer:
    """How a request becomes the prompt the engine completes: what the program's forward sends for the same inputs.

    Attributes:
        prompt: the serving program's prompt (instruction, demos, fields).
        input_names: the program's declared inputs, in order.
        retrieve: search of the pinned index version, or None when the program does not retrieve. It has no
            per-query cache: a server sees an unbounded stream of distinct queries.
        retrieve_k: passages per request (the serving program's: declared, or chosen on dev).
    """

    prompt: ServingPrompt
    input_names: list[str]
    retrieve: Retriever | None
    retrieve_k: int

    def render(self, inputs: Mapping[str, Any]) -> Rendered:
        """The prompt for one request, the ids of the passages in it and what its answer chooses among."""
        values = {name: inputs.get(name) for name in self.input_names}
        passages: list[Passage] = []
        context = self.prompt.spec.context_field
        if self.retrieve is not None and context:
            passages = self.retrieve(retrieval_query(values, self.input_names), self.retrieve_k)
            values = {context: [p.render(self.prompt.passage_format) for p in passages], **values}
        return Rendered(self.prompt.render(values), [p.id for p in passages], self.prompt.candidates(passages))


@dataclass
class SpecialistRuntime:
    """What answers for one specialist: how requests are rendered, and the adapter, fixed at build time.

    Attributes:
        name: the specialist.
        versions: the versions actually serving (an adapter champion without a GGUF serves the base model).
        registry: the versions the registry showed when this was built (what the watcher compares with).
        renderer: the program's prompt and retrieval (`render` makes a request's prompt with it).
        max_tokens: the program's answer length.
        temperature: the program's temperature.
        engine: the llama.cpp engine of the specialist's base model.
        adapter: lease on the adapter in that engine.
        built_at: when this snapshot was built (epoch seconds).
    """

    name: str
    versions: ChampionVersions
    registry: ChampionVersions
    renderer: RequestRenderer
    max_tokens: int
    temperature: float
    engine: LoraEngine
    adapter: AdapterLease
    built_at: float = field(default_factory=time.time)

    @property
    def spec(self) -> PromptSpec:
        """The prompt spec of the program's predictor (its instruction, inputs, outputs)."""
        return self.renderer.prompt.spec

    @property
    def input_names(self) -> list[str]:
        return self.renderer.input_names

    @property
    def output_names(self) -> list[str]:
        return [f.name for f in self.spec.outputs]

    def render(self, inputs: Mapping[str, Any]) -> Rendered:
        """The prompt for one request, the ids of the passages in it and what its answer chooses among."""
        return self.renderer.render(inputs)

    @property
    def answer_mode(self) -> str:
        """`free`, or how the answer is taken from the retrieved ids (`constrained`, `score`)."""
        return self.renderer.prompt.answer_mode

    def generate(
        self,
        prompt: str,
        *,
        adapter: AdapterLease,
        candidates: list[str],
        max_tokens: int,
        temperature: float,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        prompt_tokens: int | None = None,
    ) -> Generation:
        """Answer a rendered request: a free completion (streamed), or one of the `candidates` (`Rendered.candidates`:
        the retrieved ids or titles) by the program's answer mode, with the rule the flows evaluated
        (`answer_from_candidates`), sent whole."""
        if self.answer_mode == "free":
            return self.engine.generate(
                prompt,
                adapter=adapter,
                max_tokens=max_tokens,
                stop=self.spec.stop,
                temperature=temperature,
                on_text=on_text,
                cancelled=cancelled,
                prompt_tokens=prompt_tokens,
            )
        started = time.perf_counter()
        completion = answer_from_candidates(
            self.engine.client(adapter),
            prompt,
            candidates,
            mode=self.answer_mode,
            max_tokens=max_tokens,
            stop=self.spec.stop,
            temperature=temperature,
            retrieval_weight=self.renderer.prompt.retrieval_weight,
        )
        if on_text is not None and completion.text:
            on_text(completion.text)
        tokens = prompt_tokens if prompt_tokens is not None else len(self.engine.tokenize(prompt))
        return Generation(
            text=completion.text,
            prompt_tokens=tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason="stop",
            queue_seconds=0.0,
            seconds=time.perf_counter() - started,
        )

    def close(self) -> None:
        self.adapter.release()


@dataclass(frozen=True)
class Unavailable:
    """A specialist that cannot serve now, why, and the registry state that was tried."""

    name: str
    reason: str
    registry: ChampionVersions | None = None


class Team:
    """Specialist name → the snapshot serving it; swapped atomically."""

    def __init__(self, names: list[str]):
        self._entries: dict[str, SpecialistRuntime | Unavailable] = {
            name: Unavailable(name, "not loaded yet") for name in names
        }
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> SpecialistRuntime | Unavailable:
        return self._entries[name]

    def checkout(self, name: str) -> tuple[SpecialistRuntime, AdapterLease]:
        """The snapshot serving `name` and a lease on its adapter, to hold until the request is done.

        Raises:
            KeyError: no such specialist.
            SpecialistUnavailable: it cannot serve now.
        """
        with self._lock:
            entry = self._entries[name]
            if isinstance(entry, Unavailable):
                raise SpecialistUnavailable(entry.reason)
            return entry, entry.adapter.share()

    def install(self, name: str, entry: SpecialistRuntime | Unavailable) -> SpecialistRuntime | Unavailable:
        """Swap in a new snapshot (or mark unavailable); returns the one it replaced, whose adapter lease is released.

        Requests that took the old snapshot keep their own leases and finish on it.
        """
        with self._lock:
            old = self._entries[name]
            self._entries[name] = entry
            if isinstance(entry, SpecialistRuntime) and isinstance(old, SpecialistRuntime):
                self.swaps += 1
        if isinstance(old, SpecialistRuntime) and old is not entry:
            old.close()
        return old

    def close(self) -> None:
        for name in self.names:
            self.install(name, Unavailable(name, "server stopping"))


# ------------------------------------------------------------------------------------ building


@dataclass(frozen=True)
class RegistrySource:
    """The slice of config the team reads champions from.

    Attributes:
        tracking_uri: the MLflow server with the registry.
        project: project name (prefix of the registered models).
        state_dir: where the live index pointers are and where artifacts are downloaded to.
    """

    tracking_uri: str
    project: str
    state_dir: str


def current_versions(source: RegistrySource, specialist: str, retrieves: bool) -> ChampionVersions:
    """The champion versions the registry's aliases show now (three alias reads).

    The index version is the one the `index` champion was built as (its tag `cadre.lineage.index_version`). A
    state dir of the previous release, whose index was never registered, is read as it was: its `live.json`.
    """
    from mlflow import MlflowClient

    from cadre.knowledge.reindex import live_version
    from cadre.registry.models import version_by_alias
    from cadre.registry.versions import CHAMPION, registered_model_name

    client = MlflowClient(source.tracking_uri)

    def champion(kind: str) -> Any:
        return version_by_alias(client, registered_model_name(source.project, specialist, kind), CHAMPION)

    program, adapter = champion("program"), champion("adapter")
    index = index_model = None
    if retrieves:
        found = champion("index")
        if found is not None and found.tags.get("cadre.lineage.index_version"):
            index, index_model = found.tags["cadre.lineage.index_version"], str(found.version)
        else:
            index = live_version(Path(source.state_dir), specialist)
    return ChampionVersions(
        program=program and str(program.version),
        adapter=adapter and str(adapter.version),
        index=index,
        index_model=index_model,
    )


def index_retriever(config: CadreConfig, specialist: str, registry: ChampionVersions, source: RegistrySource) -> Any:
    """Search of the index version that serves: the local table when this state dir holds it, else the registered
    index version's own table, downloaded once to `<state_dir>/serving/<specialist>/index-v<N>/`.

    Raises:
        SpecialistUnavailable: the version is neither here nor in the registry as a model with its table.
    """
    from cadre.knowledge.index import IndexLayout
    from cadre.registry.models import download_version, index_search, model_settings
    from cadre.registry.versions import registered_model_name

    if registry.index_model is None or IndexLayout(config.state_dir, specialist).is_complete(registry.index):
        return open_index_search(IndexTarget.from_config(config, specialist, pin_live=False), registry.index)
    name = registered_model_name(source.project, specialist, "index")
    folder = Path(source.state_dir) / "serving" / specialist / f"index-v{registry.index_model}"
    settings = model_settings(download_version(name, registry.index_model, folder, source.tracking_uri))
    if settings is None:
        raise SpecialistUnavailable(
            f"{name} v{registry.index_model} (index {registry.index}) was registered without its table and is not in "
            f"{config.state_dir}; re-index (`cadre run reindex -s {specialist}`) to register one that carries it"
        )
    return index_search(folder, settings)


def download_champion(source: RegistrySource, specialist: str, kind: str, version: str, suffix: str) -> Path | None:
    """Download the file of a champion version's artifact that ends with `suffix` (`program.json`, `.gguf`); None if it has none.

    Files are kept under `<state_dir>/serving/<specialist>/<kind>-v<version>/` and reused; a download goes to a
    temporary folder first, so a crash never leaves half a file that looks complete.
    """
    from mlflow import MlflowClient

    from cadre.registry.versions import registered_model_name

    folder = Path(source.state_dir) / "serving" / specialist / f"{kind}-v{version}"
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix)) if folder.is_dir() else []
    if found:
        return found[0]
    client = MlflowClient(source.tracking_uri)
    model_version = client.get_model_version(registered_model_name(source.project, specialist, kind), version)
    artifact = model_version.tags.get("cadre.artifact_path", kind)
    wanted = _find_artifact(client, model_version.run_id, artifact, suffix)
    if wanted is None:
        return None
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    client.download_artifacts(model_version.run_id, wanted, str(partial))
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return next(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix))


def _find_artifact(client: Any, run_id: str, path: str, suffix: str) -> str | None:
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            nested = _find_artifact(client, run_id, item.path, suffix)
            if nested:
                return nested
        elif item.path.endswith(suffix):
            return item.path
    return None


def build_runtime(
    config: CadreConfig, specialist: str, registry: ChampionVersions, engine: LoraEngine, source: RegistrySource
) -> SpecialistRuntime:
    """Build a specialist's snapshot for the given champion versions (downloads, loads the program, the adapter).

    Raises:
        SpecialistUnavailable: the program retrieves and no index version is live.
    """
    settings = config.specialist(specialist)
    program_settings = settings.program
    retrieve = None
    if program_settings.retrieve_k:
        if registry.index is None:
            raise SpecialistUnavailable(
                f"specialist {specialist!r} retrieves (retrieve_k={program_settings.retrieve_k}) but has no live "
                "index yet; run the re-index flow (`cadre run reindex`) and it will serve within one poll"
            )
        retrieve = index_retriever(config, specialist, registry, source)

    program_file = (
        download_champion(source, specialist, "program", registry.program, "program.json") if registry.program else None
    )
    adapter_file = (
        download_champion(source, specialist, "adapter", registry.adapter, ".gguf") if registry.adapter else None
    )
    if registry.adapter and adapter_file is None:
        log.warning("%s: champion adapter v%s has no GGUF file; serving the base model", specialist, registry.adapter)
    return assemble_runtime(specialist, program_settings, program_file, retrieve, adapter_file, engine, registry)


def assemble_runtime(
    specialist: str,
    program_settings: ProgramSettings,
    program_file: Path | None,
    retrieve: Retriever | None,
    adapter_file: Path | None,
    engine: LoraEngine,
    registry: ChampionVersions,
) -> SpecialistRuntime:
    """The snapshot of one specialist from its local files: what `cadre serve` and the MLflow models both answer with.

    Args:
        specialist: its name.
        program_settings: the declared program.
        program_file: the champion's `program.json` (None: the declared program).
        retrieve: search of the pinned index version (None: the program does not retrieve).
        adapter_file: the adapter's GGUF (None: the base model).
        engine: the base model's engine; the adapter is loaded into it.
        registry: the versions these files are.
    """
    prompt = read_serving_prompt(program_settings, program_file)
    lease = engine.load_adapter(adapter_file)
    served = ChampionVersions(
        program=registry.program if program_file else None,
        adapter=registry.adapter if adapter_file else None,
        index=registry.index if retrieve is not None else None,
    )
    return SpecialistRuntime(
        name=specialist,
        versions=served,
        registry=registry,
        renderer=RequestRenderer(prompt, [f.name for f in program_settings.inputs], retrieve, prompt.retrieve_k),
        max_tokens=program_settings.max_tokens,
        temperature=program_settings.temperature,
        engine=engine,
        adapter=lease,
    )


def answer(runtime: SpecialistRuntime, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Answer one case as a request without overrides is answered: render, generate greedily, parse the fields.

    Returns:
        `{"answer": text, "outputs": {field: value}, "retrieved_ids": [...]}`.
    """
    prompt, retrieved, candidates = runtime.render(inputs)
    lease = runtime.adapter.share()
    try:
        generation = runtime.generate(
            prompt,
            adapter=lease,
            candidates=candidates,
            max_tokens=runtime.max_tokens,
            temperature=runtime.temperature,
        )
    finally:
        lease.release()
    return {
        "answer": generation.text.strip(),
        "outputs": parse_completion(runtime.spec, generation.text),
        "retrieved_ids": retrieved,
    }


# ------------------------------------------------------------------------------------- watching


class ChampionWatcher:
    """Polls champions every `interval_s` and swaps in new snapshots when they move (a daemon thread)."""

    def __init__(
        self,
        team: Team,
        resolve: Callable[[str], ChampionVersions],
        build: Callable[[str, ChampionVersions], SpecialistRuntime],
        interval_s: float,
    ):
        self.team = team
        self.resolve = resolve
        self.build = build
        self.interval_s = interval_s
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self._failed: dict[str, ChampionVersions] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cadre-champion-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> list[str]:
        """Check every specialist once; returns the names whose snapshot was swapped."""
        swapped = []
        for name in self.team.names:
            try:
                wanted = self.resolve(name)
            except Exception as error:  # noqa: BLE001 - a registry hiccup must not stop serving; retried next poll
                self.last_error = f"{name}: could not read champions: {error}"
                log.warning(self.last_error)
                continue
            entry = self.team.entry(name)
            if entry.registry == wanted:
                continue  # serving these versions, or known to be unable to (e.g. no live index yet)
            started = time.perf_counter()
            try:
                runtime = self.build(name, wanted)
            except SpecialistUnavailable as error:
                if isinstance(entry, Unavailable):
                    self.team.install(name, Unavailable(name, str(error), wanted))
                self._remember_failure(name, wanted, str(error))
                continue
            except Exception as error:  # noqa: BLE001 - keep the old snapshot serving; retried at the next poll
                self._remember_failure(name, wanted, f"{type(error).__name__}: {error}")
                continue
            self._failed.pop(name, None)
            self.team.install(name, runtime)
            swapped.append(name)
            before = entry.registry.describe() if entry.registry else {}
            log.info(
                "%s: champions moved %s -> %s; swapped in %.1f s",
                name,
                json.dumps(before),
                json.dumps(wanted.describe()),
                time.perf_counter() - started,
            )
        self.last_poll = time.time()
        return swapped

    def _remember_failure(self, name: str, wanted: ChampionVersions, reason: str) -> None:
        if self._failed.get(name) != wanted:
            log.error(
                "%s: could not load champions %s; the previous ones keep serving: %s",
                name,
                json.dumps(wanted.describe()),
                reason,
            )
        self._failed[name] = wanted
        self.last_error = f"{name}: {reason}"
