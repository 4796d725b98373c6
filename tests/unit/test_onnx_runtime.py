"""The ONNX embedding runtimes (`project.embedding.runtime: onnx | onnx-int8`) against the torch runtime.

Real model (the packaged MiniLM), real export (torch.onnx) and quantization (onnxruntime), on the first 200 phrases of
the ICD-10 test suite: fp32 gives torch's vectors; int8 stays close and finds the same nearest documents almost
always; the export is made once into `CADRE_ONNX_CACHE` and reused; an int8 index key differs from an fp32 one while
fp32 keys (and the digests of existing indexes) are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cadre.config.project import EmbeddingSettings, ThreadSettings
from cadre.knowledge.embedding import Embedder, resolve_model_path
from cadre.knowledge.index.manifest import IndexKey

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = resolve_model_path("packaged:all-minilm-l6-v2")


@pytest.fixture(scope="module")
def phrases() -> list[str]:
    lines = (ROOT / "evals" / "suites" / "icd10-coder" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["phrase"] for line in lines[:200]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("CADRE_ONNX_CACHE", str(folder))
    yield folder
    patch.undo()


def _embedder(runtime: str) -> Embedder:
    return Embedder.load(
        EmbeddingSettings(model=str(PACKAGED), batch_size=32, runtime=runtime), ThreadSettings(embedding=1)
    )


def test_onnx_fp32_embeds_what_torch_embeds(cache: Path, phrases: list[str]) -> None:
    torch_vectors = _embedder("torch").embed(phrases)
    onnx = _embedder("onnx")
    assert onnx.runtime == "onnx" and onnx.precision == "fp32"
    vectors = onnx.embed(phrases)
    assert vectors.shape == torch_vectors.shape and vectors.dtype == np.float32
    assert np.abs(vectors - torch_vectors).max() < 1e-5
    assert onnx.embed([]).shape == (0, 384)


def test_onnx_int8_stays_close_and_keeps_the_nearest_neighbours(cache: Path, phrases: list[str]) -> None:
    torch_vectors = _embedder("torch").embed(phrases)
    int8 = _embedder("onnx-int8")
    assert int8.precision == "int8"
    vectors = int8.embed(phrases)
    cosines = (vectors * torch_vectors).sum(axis=1)
    assert cosines.mean() > 0.985 and cosines.min() > 0.97, (cosines.mean(), cosines.min())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Each phrase's nearest other phrase is the same under both runtimes for nearly all of them.
    nearest = [np.argsort(-(v @ v.T), axis=1)[:, 1] for v in (torch_vectors, vectors)]
    assert np.mean(nearest[0] == nearest[1]) > 0.8  # phrases have near-ties; bench/embed.py measures recall


def test_the_export_is_made_once_and_reused(cache: Path, phrases: list[str]) -> None:
    _embedder("onnx").embed(phrases[:2])
    files = sorted(cache.rglob("*.onnx"))
    assert files and all(not f.name.startswith(".") for f in files), "no temporary file left behind"
    stamps = {f: f.stat().st_mtime_ns for f in files}
    from cadre.knowledge import embedding

    embedding._ENCODER_CACHE.clear()  # a new process: loads from the cache, exports nothing
    _embedder("onnx").embed(phrases[:2])
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.rglob("*.onnx"))} == stamps


def test_an_int8_index_key_differs_and_fp32_keys_are_unchanged() -> None:
    fp32 = IndexKey("packaged:all-minilm-l6-v2", "abc", 384, 128, 16)
    int8 = IndexKey("packaged:all-minilm-l6-v2", "abc", 384, 128, 16, embedding_precision="int8")
    assert fp32 != int8 and fp32.digest != int8.digest
    assert "embedding_precision" not in fp32.as_dict(), "keys written before precision existed stay equal"
    assert IndexKey.from_dict(fp32.as_dict()) == fp32 and IndexKey.from_dict(int8.as_dict()) == int8
