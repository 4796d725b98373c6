"""An edge bundle: one folder holding everything a specialist's champion answers with, checksummed.

Layout (`bundle.json` names every other file with its sha256 and size)::

    bundle.json                                       format, lineage (registry versions), runtime settings, files
    prompt.json                                       the serving prompt (`ServingPrompt.to_json`) + inputs, max_tokens
    model/base.gguf                                   the base model llama.cpp runs (the packaged Q4_K_M GGUF)
    model/adapter.gguf                                the champion LoRA adapter in GGUF form, applied at load (if any)
    knowledge/index/<specialist>/lancedb/<v>.lance    the champion index version's LanceDB table
    knowledge/index/<specialist>/manifests/<v>.json   its manifest (which embedder embedded it)
    knowledge/index/<specialist>/rankers/<v>.json     its learned ranking, where the version has one
    embedder/                                         that embedding model's folder (sentence-transformers)
    requirements.txt                                  the runner's dependencies, pinned (no torch, MLflow, Prefect)

The adapter is *not* merged into the base: llama.cpp applies it at load, exactly as `cadre serve` does at run
time, so the bundle answers what the server answers. Merging works offline with what is installed (peft
`merge_and_unload` on the fp32 base, `convert_hf_to_gguf.py`, `llama_cpp.llama_model_quantize`: ~65 s), but measured on
a 20-step champion adapter and 30 ICD test prompts it does not keep the champion: re-quantized to Q4_K_M the merged
model answered like the bare base (11 of 12 free answers identical to the base's, 0 of 30 equal to runtime LoRA's; the
adapter's small deltas round back onto the base's 4-bit grid), and merged f16 / Q8_0 (551 / 300 MB) agreed with
runtime LoRA on only 24 / 23 of 30 free answers.

`knowledge/` is laid out as a state dir, so the runner searches it with the index code every stage uses
(`cadre.runtime.retrieval.open_index_search`). `export_bundle` writes the folder under a temporary name and renames
it into place; `verify_bundle` refuses a bundle whose format is unknown, a file missing or changed, or whose adapter
was made for another base model, with a message that names the file and what to do.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.runtime.base_model import file_sha256

if TYPE_CHECKING:
    from cadre.config import ProgramSettings

BUNDLE_FORMAT = 1
MANIFEST_FILE = "bundle.json"
PROMPT_FILE = "prompt.json"
BASE_FILE = "model/base.gguf"
ADAPTER_FILE = "model/adapter.gguf"
KNOWLEDGE_DIR = "knowledge"
EMBEDDER_DIR = "embedder"
REQUIREMENTS_FILE = "requirements.txt"
RUNNER_PACKAGES = (
    "llama-cpp-python",  # the base model and its adapter
    "lancedb",  # the index (pyarrow comes with it)
    "numpy",
    "tokenizers",  # the query encoder (cadre.edge.encoder)
    "safetensors",
    "threadpoolctl",
    "pydantic",  # Cadre's settings
    "ruamel.yaml",
    "rich",  # the command line
    "httpx",
)
"""What the runner imports besides Cadre; the bundle's `requirements.txt` pins them (`runner_requirements`)."""


class BundleError(RuntimeError):
    """A bundle cannot be made or opened; the message names the file and what to do."""


@dataclass(frozen=True)
class BundleParts:
    """The local files of a specialist's champion, and what the registry calls them.

    Attributes:
        specialist: whose champion.
        program: the declared program (`specialists[].program`): its fields, max_tokens, temperature.
        program_file: the champion's `program.json`; None: the declared program serves.
        base_model: the base model's name in pipelines.yaml (e.g. `gemma3-270m`).
        base_gguf: the base GGUF that llama.cpp runs.
        adapter_gguf: the champion adapter as a llama.cpp LoRA GGUF; None: the bare base model serves.
        index_state_dir: a state dir holding the champion index version (`<state_dir>/index/<specialist>/…`).
        index_version: that version's name; None when the program does not retrieve.
        search_mode: the specialist's `index.search_mode`.
        root: the project folder (a relative or `packaged:` embedding model is resolved from it).
        n_ctx: llama.cpp context window (`project.lm.n_ctx`).
        embedding_batch_size: `project.embedding.batch_size`.
        lineage: registry versions of the parts (`program`, `adapter`, `index`, …); recorded as they are.
    """

    specialist: str
    program: ProgramSettings
    program_file: Path | None
    base_model: str
    base_gguf: Path
    adapter_gguf: Path | None = None
    index_state_dir: Path | None = None
    index_version: str | None = None
    search_mode: str = "hybrid"
    root: Path | None = None
    n_ctx: int = 2048
    embedding_batch_size: int = 64
    lineage: dict[str, Any] = field(default_factory=dict)


def export_bundle(parts: BundleParts, to: Path) -> Path:
    """Write the bundle of `parts` to the folder `to` (replaced if it holds a bundle) and return it.

    Raises:
        BundleError: a part is missing (the program retrieves and no index version is given, the index version has no
            manifest or table, the embedding model that built it is gone or changed), or `to` is a folder that is not
            a bundle.
    """
    from cadre.runtime.serving_prompt import read_serving_prompt

    to = Path(to)
    check_bundle_target(to)
    prompt = read_serving_prompt(parts.program, parts.program_file)
    retrieves = prompt.spec.context_field is not None and prompt.retrieve_k > 0
    partial = to.with_name(f"{to.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "model").mkdir(parents=True)
    try:
        content = {
            **prompt.to_json(),
            "input_names": [f.name for f in parts.program.inputs],
            "max_tokens": parts.program.max_tokens,
            "temperature": parts.program.temperature,
        }
        (partial / PROMPT_FILE).write_text(json.dumps(content, indent=1, ensure_ascii=False), encoding="utf-8")
        shutil.copyfile(parts.base_gguf, partial / BASE_FILE)
        if parts.adapter_gguf is not None:
            shutil.copyfile(parts.adapter_gguf, partial / ADAPTER_FILE)
        index = _copy_index(parts, partial) if retrieves else None
        (partial / REQUIREMENTS_FILE).write_text(runner_requirements(), encoding="utf-8")
        files = {
            path.relative_to(partial).as_posix(): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
            for path in sorted(partial.rglob("*"))
            if path.is_file()
        }
        base_sha256 = files[BASE_FILE]["sha256"]
        adapter = None
        if parts.adapter_gguf is not None:
            adapter = {
                "file": ADAPTER_FILE,
                "base_sha256": base_sha256,
                "base_model": parts.lineage.get("adapter_base_model") or parts.base_model,
            }
        manifest = {
            "format": BUNDLE_FORMAT,
            "kind": "cadre-edge-bundle",
            "specialist": parts.specialist,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cadre_version": _cadre_version(),
            "lineage": parts.lineage,
            "runtime": {"n_ctx": parts.n_ctx},
            "prompt": PROMPT_FILE,
            "model": {
                "base": {"file": BASE_FILE, "name": parts.base_model, "sha256": base_sha256},
                "adapter": adapter,
                "merged": False,
            },
            "index": index,
            "files": files,
            "bytes": sum(entry["bytes"] for entry in files.values()),
        }
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_folder(partial, to)
    return to


def check_bundle_target(to: Path) -> None:
    """Refuse to write a bundle over a folder that holds something else than a bundle.

    Raises:
        BundleError: `to` exists, is not empty, and holds no `bundle.json`.
    """
    if to.exists() and not (to / MANIFEST_FILE).is_file() and any(to.iterdir()):
        raise BundleError(f"{to} exists and is not a bundle; choose an empty or new folder (--to DIR)")


def replace_folder(source: Path, target: Path) -> None:
    """Move the folder `source` to `target`, replacing what is there (renamed aside first, removed after)."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.replace(old)
    target.parent.mkdir(parents=True, exist_ok=True)
    source.replace(target)
    shutil.rmtree(old, ignore_errors=True)


def _copy_index(parts: BundleParts, bundle: Path) -> dict[str, Any]:
    """Copy the index version's table and manifest, and the embedding model that built it; their manifest entry."""
    from cadre.knowledge.embedding import model_fingerprint, resolve_model_path
    from cadre.knowledge.index import IndexLayout
    from cadre.knowledge.index.live import write_json_atomic

    if parts.index_state_dir is None or parts.index_version is None:
        raise BundleError(
            f"specialist {parts.specialist!r} retrieves, and no index version was given: run the re-index flow "
            f"(`cadre run reindex -s {parts.specialist}`) so that an index is champion, then export again"
        )
    source = IndexLayout(Path(parts.index_state_dir), parts.specialist)
    version = parts.index_version
    manifest = source.read_manifest(version)
    table = source.lancedb_dir / f"{version}.lance"
    if manifest is None or not table.is_dir():
        raise BundleError(
            f"index version {version} of {parts.specialist!r} is not complete in {parts.index_state_dir} (a bundle "
            "carries a LanceDB table and its manifest; a Weaviate index cannot be bundled)"
        )
    key = manifest.index_key
    try:
        model_dir = resolve_model_path(source.embedding_model(key), parts.root)
    except ValueError as error:
        raise BundleError(f"index version {version} was embedded with {key.embedding_model}: {error}") from None
    if model_fingerprint(model_dir) != key.embedding_fingerprint:
        raise BundleError(
            f"index version {version} was embedded with {key.embedding_model} (fingerprint "
            f"{key.embedding_fingerprint}); {model_dir} now holds another model, so its queries would not match"
        )
    target = IndexLayout(bundle / KNOWLEDGE_DIR, parts.specialist)
    shutil.copytree(table, target.lancedb_dir / table.name)
    # Whole, as the bundle carries no other version (here it may be a difference from one).
    write_json_atomic(target.manifest_path(version), source.manifest_json(version))
    ranker = source.ranker_path(version)
    if ranker.is_file():  # the version's learned ranking (search_mode: learned) ranks the bundle's searches too
        target.rankers_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ranker, target.ranker_path(version))
    shutil.copytree(model_dir, bundle / EMBEDDER_DIR, ignore=shutil.ignore_patterns(".*"))
    return {
        "state_dir": KNOWLEDGE_DIR,
        "version": version,
        "search_mode": parts.search_mode,
        "embedder": EMBEDDER_DIR,
        "embedder_fingerprint": key.embedding_fingerprint,
        "embedder_model": key.embedding_model,
        "batch_size": parts.embedding_batch_size,
    }


def runner_requirements() -> str:
    """`requirements.txt` of the runner: what `cadre answer --bundle` imports besides Cadre, pinned as installed here.

    A machine that runs bundles installs these and Cadre without its dependencies (`pip install --no-deps cadre`):
    no torch, MLflow, Prefect or DSPy.
    """
    from importlib.metadata import PackageNotFoundError, version

    lines = [
        "# cadre answer --bundle / cadre serve --bundle: pip install -r requirements.txt && pip install --no-deps cadre",
        "# x86 CPU with AMX (Intel Xeon 4th gen+): llama.cpp's AMX kernels crash (llama.cpp #20824); install with",
        '#   CMAKE_ARGS="-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8" pip install -r requirements.txt',
    ]
    for package in RUNNER_PACKAGES:
        try:
            lines.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            lines.append(package)
    return "\n".join(lines) + "\n"


def _cadre_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cadre")
    except PackageNotFoundError:
        return "unknown"


def model_name(identity: str | None) -> str:
    """The base model's name in an identity `name@<config hash>` (`base_model_id`); a bare name as it is."""
    name, at, _ = str(identity or "").rpartition("@")
    return name if at else str(identity or "")


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check a bundle before anything loads from it; return its `bundle.json`.

    Checked: the format version, that every file `bundle.json` lists is there with its size and sha256, and that the
    adapter (if any) was made for the bundle's base model.

    Raises:
        BundleError: the first kind of problem found, naming every file it concerns and what to do.
    """
    folder = Path(folder)
    again = f"copy the whole bundle folder again, or export it again (`cadre export -s SPECIALIST --to {folder}`)"
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{folder} holds no {MANIFEST_FILE}: it is not a Cadre bundle (make one with `cadre export`), or it was "
            f"copied incompletely ({again})"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON ({error}); {again}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: bundle format {found!r} is not one this Cadre reads (it reads format {BUNDLE_FORMAT}); "
            f"export the specialist again with this Cadre (`cadre export`), or open the bundle with the Cadre that "
            f"wrote it ({manifest.get('cadre_version', 'unknown') if isinstance(manifest, dict) else 'unknown'})"
        )
    files: dict[str, dict[str, Any]] = manifest.get("files") or {}
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        listed = ", ".join(f"{name} ({files[name]['bytes']:,} bytes)" for name in missing)
        raise BundleError(f"bundle {folder} is incomplete: missing {listed}; {again}")
    changed = []
    for name, entry in files.items():
        size = (folder / name).stat().st_size
        if size != entry["bytes"]:
            changed.append(f"{name} has {size:,} bytes, {MANIFEST_FILE} records {entry['bytes']:,}")
        elif file_sha256(folder / name) != entry["sha256"]:
            changed.append(f"{name} has another sha256 than {MANIFEST_FILE} records ({entry['sha256'][:16]}…)")
    if changed:
        raise BundleError(f"bundle {folder} was changed or corrupted: {'; '.join(changed)}; {again}")
    base, adapter = manifest["model"]["base"], manifest["model"].get("adapter")
    if adapter and (
        adapter.get("base_sha256") != base["sha256"] or model_name(adapter.get("base_model")) != base["name"]
    ):
        raise BundleError(
            f"bundle {folder}: {adapter['file']} was made for the base model {adapter.get('base_model')} (GGUF sha256 "
            f"{str(adapter.get('base_sha256'))[:16]}…), but {base['file']} is {base['name']} (sha256 "
            f"{base['sha256'][:16]}…); a LoRA adapter only fits the base it was trained on: export the specialist "
            "again so that both come from the same champion"
        )
    return manifest
