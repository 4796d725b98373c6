"""Answer from an edge bundle with no stack: no MLflow, no Prefect, no server, nothing on the network.

Usage::

    from cadre.edge import Bundle

    bundle = Bundle.open("icd10-coder-bundle")             # verifies every file first (BundleError if not)
    bundle.answer({"phrase": "typhoid endocarditis"})      # {"answer": "A01.02", "outputs": {...}, "retrieved_ids": [...]}

The bundle is opened into the same `SpecialistRuntime` that `cadre serve` builds for a specialist (the llama.cpp
engine on the base GGUF with the adapter applied, the serving prompt, the index search) and answered with the same
`cadre.serving.team.answer`: the same rendering (`ServingPrompt.render`), the same search (`open_index_search` on the
bundled LanceDB table, queries embedded with the bundled model) and the same answer rule (a plain completion, or
`answer_from_candidates` for `constrained` / `score`). Only the files differ: they come from the folder.

Queries are embedded with `cadre.edge.encoder.NumpyEncoder` (the same vectors as sentence-transformers to ~1e-6), so
answering never imports torch, transformers or sentence-transformers (~10 s of a cold start); a bundled embedding
model that encoder does not implement is run by sentence-transformers instead, with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.edge.bundle import MANIFEST_FILE, BundleError, verify_bundle

if TYPE_CHECKING:
    from cadre.runtime.retrieval import Retriever
    from cadre.serving.team import Rendered, SpecialistRuntime

logger = logging.getLogger(__name__)


@dataclass
class Bundle:
    """An opened bundle: its `bundle.json` and the runtime that answers.

    Attributes:
        folder: the bundle folder.
        manifest: its `bundle.json`.
        runtime: what answers (the serving runtime, built from the folder's files).
        opened_in_s: seconds `open` took (verification, model load; the embedding model loads at the first query).
    """

    folder: Path
    manifest: dict[str, Any]
    runtime: SpecialistRuntime
    opened_in_s: float

    @classmethod
    def open(cls, folder: str | Path, *, n_threads: int = 1, verify: bool = True) -> Bundle:
        """Verify a bundle (`verify_bundle`) and load it.

        Args:
            folder: the bundle folder (`cadre export --to`).
            n_threads: llama.cpp and embedding threads (1: an edge-class budget; fastest on a shared 2-core machine).
            verify: check every file's sha256 first (reads the whole bundle once; skip only for a bundle just checked).

        Raises:
            BundleError: the bundle is incomplete, changed, of an unknown format, or its adapter does not fit its base.
        """
        from cadre.runtime.serving_prompt import ServingPrompt
        from cadre.serving.engine import EngineError, LoraEngine
        from cadre.serving.team import ChampionVersions, RequestRenderer, SpecialistRuntime

        started = time.perf_counter()
        folder = Path(folder)
        manifest = verify_bundle(folder) if verify else json.loads((folder / MANIFEST_FILE).read_text("utf-8"))
        content = json.loads((folder / manifest["prompt"]).read_text(encoding="utf-8"))
        prompt = ServingPrompt.from_json(content)
        index = manifest.get("index")
        retrieve = _index_search(folder, manifest["specialist"], index, n_threads) if index else None
        model = manifest["model"]
        engine = LoraEngine(
            folder / model["base"]["file"], contexts=1, n_threads=n_threads, n_ctx=manifest["runtime"]["n_ctx"]
        )
        adapter = model.get("adapter")
        try:
            lease = engine.load_adapter(folder / adapter["file"] if adapter else None)
        except EngineError as error:
            engine.close()
            raise BundleError(
                f"bundle {folder}: {error}; the adapter does not fit {model['base']['file']}: export the specialist again"
            ) from None
        lineage = manifest.get("lineage") or {}
        versions = ChampionVersions(
            program=lineage.get("program"),
            adapter=lineage.get("adapter") if adapter else None,
            index=index["version"] if index else None,
            index_model=lineage.get("index"),
        )
        runtime = SpecialistRuntime(
            name=manifest["specialist"],
            versions=versions,
            registry=versions,
            renderer=RequestRenderer(prompt, list(content["input_names"]), retrieve, prompt.retrieve_k),
            max_tokens=int(content["max_tokens"]),
            temperature=float(content["temperature"]),
            engine=engine,
            adapter=lease,
        )
        return cls(folder, manifest, runtime, time.perf_counter() - started)

    @property
    def input_names(self) -> list[str]:
        """The program's input fields, in order."""
        return self.runtime.input_names

    def render(self, inputs: Mapping[str, Any]) -> Rendered:
        """The prompt the model reads for these inputs, the ids of the passages in it, and what its answer chooses
        among (`cadre.serving.team.Rendered`)."""
        return self.runtime.render(inputs)

    def answer(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one case as `cadre serve` answers a request without overrides.

        Args:
            inputs: the program's input fields (`{"phrase": "…"}`); other keys are ignored.

        Returns:
            `{"answer": text, "outputs": {field: value}, "retrieved_ids": [...]}`.

        Raises:
            ValueError: no input field of the program has a value.
        """
        from cadre.serving.team import answer

        if not any(inputs.get(name) for name in self.input_names):
            raise ValueError(f"give a value for the program's input field(s): {', '.join(self.input_names)}")
        return answer(self.runtime, inputs)

    def close(self) -> None:
        """Free the model and its adapter."""
        self.runtime.close()
        self.runtime.engine.close()


def _index_search(folder: Path, specialist: str, index: dict[str, Any], n_threads: int) -> Retriever:
    """`open_index_search` on the bundled table, embedding queries with the bundled model (checked by fingerprint)
    on the numpy runtime when the encoder implements it."""
    from cadre.config.project import EmbeddingSettings, IndexBackendSettings, ThreadSettings
    from cadre.edge.encoder import EncoderSpec
    from cadre.runtime.retrieval import IndexTarget, open_index_search

    runtime = "numpy"
    try:
        EncoderSpec.read(folder / index["embedder"])
    except ValueError as error:
        logger.warning("%s; queries are embedded with sentence-transformers (imports torch: slower to start)", error)
        runtime = "torch"
    target = IndexTarget(
        specialist=specialist,
        state_dir=str(folder / index["state_dir"]),
        root=str(folder),
        backend=IndexBackendSettings(),
        embedding=EmbeddingSettings(model=index["embedder"], batch_size=index["batch_size"]),
        threads=ThreadSettings(torch=n_threads, embedding=n_threads),
        search_mode=index["search_mode"],
        version=index["version"],
        embed_runtime=runtime,
    )
    try:
        return open_index_search(target, index["version"])
    except ValueError as error:
        raise BundleError(f"bundle {folder}: the index cannot be searched with {index['embedder']}/: {error}") from None
