"""The numpy query encoder of edge bundles (`cadre.edge.encoder`) embeds what sentence-transformers embeds.

Real models: the packaged MiniLM, the project's fine-tuned embedder when this checkout has one (CI has none), and
copies of the packaged model that truncate at 16 tokens or pool the CLS token. Each is compared, vector by vector, with the torch runtime
(`Embedder.embed`, sentence-transformers) on the first 300 phrases of the ICD-10 test suite. A model folder with a
module or pooling the encoder does not implement is refused, naming the folder and the part.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cadre.config.project import EmbeddingSettings, ThreadSettings
from cadre.edge.encoder import NumpyEncoder
from cadre.knowledge.embedding import Embedder, model_fingerprint, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = resolve_model_path("packaged:all-minilm-l6-v2")
FINE_TUNED = next(
    (
        folder
        for folder in sorted(ROOT.glob(".cadre/embedders/*/*/model"))
        if (folder / "modules.json").is_file() and (folder / "model.safetensors").is_file()
    ),
    None,
)


@pytest.fixture(scope="module")
def phrases() -> list[str]:
    lines = (ROOT / "evals" / "suites" / "icd10-coder" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["phrase"] for line in lines[:300]]


def assert_same_vectors(numpy_vectors: np.ndarray, torch_vectors: np.ndarray) -> None:
    assert numpy_vectors.dtype == np.float32 and numpy_vectors.shape == torch_vectors.shape
    assert np.abs(numpy_vectors - torch_vectors).max() < 1e-4
    assert (numpy_vectors * torch_vectors).sum(axis=1).min() > 0.9999  # both are normalised: the dot is the cosine
    assert np.allclose(np.linalg.norm(numpy_vectors, axis=1), 1.0, atol=1e-5)


def test_the_packaged_model_embeds_as_sentence_transformers_does(phrases: list[str]) -> None:
    settings, threads = EmbeddingSettings(batch_size=32), ThreadSettings(embedding=1)
    numpy_embedder = Embedder.load(settings, threads, runtime="numpy")
    assert numpy_embedder.dimension == NumpyEncoder.load(PACKAGED).dimension == 384
    assert_same_vectors(numpy_embedder.embed(phrases), Embedder.load(settings, threads).embed(phrases))


@pytest.mark.skipif(FINE_TUNED is None, reason="no fine-tuned embedder in .cadre/embedders (run the refresh flow)")
def test_a_fine_tuned_model_embeds_as_sentence_transformers_does(phrases: list[str]) -> None:
    torch_embedder = Embedder.from_folder(FINE_TUNED, batch_size=32, threads=1)
    assert_same_vectors(NumpyEncoder.load(FINE_TUNED).embed(phrases, threads=1), torch_embedder.embed(phrases))


def packaged_copy(folder: Path, file: str, content: dict) -> Path:
    """The packaged model in `folder` (its weights linked) with one JSON file replaced."""
    shutil.copytree(PACKAGED, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(PACKAGED / "model.safetensors")
    (folder / file).write_text(json.dumps(content))
    return folder


def test_long_texts_are_truncated_at_the_model_max_seq_length(phrases: list[str], tmp_path: Path) -> None:
    short = packaged_copy(tmp_path / "short", "sentence_bert_config.json", {"max_seq_length": 16})
    texts = [" ".join(phrases[i : i + 4]) for i in range(0, 120, 4)]  # 20-60 tokens each

    # `with_model` keeps the numpy runtime (an index version recording another embedder is searched with it).
    packaged = Embedder.load(EmbeddingSettings(batch_size=8), ThreadSettings(embedding=1), runtime="numpy")
    numpy_embedder = packaged.with_model(str(short), model_fingerprint(short))
    assert numpy_embedder.runtime == "numpy" and numpy_embedder.model_dir == short.resolve()
    vectors = numpy_embedder.embed(texts)
    assert_same_vectors(vectors, Embedder.from_folder(short, batch_size=8, threads=1).embed(texts))
    assert np.array_equal(vectors, numpy_embedder.embed([text + " and more words after the cut" for text in texts]))


def test_cls_pooling_embeds_as_sentence_transformers_does(phrases: list[str], tmp_path: Path) -> None:
    cls = packaged_copy(tmp_path / "cls", "1_Pooling/config.json", {"embedding_dimension": 384, "pooling_mode": "cls"})
    torch_vectors = Embedder.from_folder(cls, batch_size=32, threads=1).embed(phrases[:100])
    numpy_vectors = NumpyEncoder.load(cls).embed(phrases[:100], threads=1)
    assert_same_vectors(numpy_vectors, torch_vectors)
    assert np.abs(numpy_vectors - NumpyEncoder.load(PACKAGED).embed(phrases[:100])).max() > 0.1  # not mean pooling


def _configs_only(tmp_path: Path) -> Path:
    """The packaged model's JSON files, no weights (the encoder checks them before reading any weight)."""
    folder = tmp_path / "model"
    shutil.copytree(PACKAGED, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.txt", "*.md"))
    return folder


def test_a_dense_module_is_refused_naming_the_folder(tmp_path: Path) -> None:
    folder = _configs_only(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=rf"embedding model {re.escape(str(folder))}: modules.json has a .*\.Dense "):
        NumpyEncoder.load(folder)


@pytest.mark.parametrize(
    ("pooling", "refused"),
    [
        ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, "max pooling"),
        ({"pooling_mode": "lasttoken"}, "lasttoken pooling"),
        ({"pooling_mode": ["mean", "max"]}, "mean \\+ max pooling"),
    ],
)
def test_an_unsupported_pooling_is_refused_naming_the_folder(tmp_path: Path, pooling: dict, refused: str) -> None:
    folder = _configs_only(tmp_path)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    with pytest.raises(ValueError, match=rf"embedding model {re.escape(str(folder))}: {refused} is not implemented"):
        NumpyEncoder.load(folder)


def test_an_unknown_runtime_is_refused() -> None:
    with pytest.raises(
        ValueError, match="unknown embedding runtime 'tensorrt'; runtimes: torch, onnx, onnx-int8, numpy"
    ):
        Embedder.load(EmbeddingSettings(), ThreadSettings(), runtime="tensorrt")  # type: ignore[arg-type]


def test_max_seq_length_is_what_sentence_transformers_truncates_at(tmp_path: Path) -> None:
    """Without `max_seq_length` in sentence_bert_config.json (a model saved by sentence-transformers 5), the tokenizer's
    `model_max_length` decides, capped at the model's positions; `Embedder.max_seq_length` reads it without loading."""
    bare = packaged_copy(tmp_path / "bare", "sentence_bert_config.json", {"do_lower_case": False})
    tokenizer = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "model_max_length": 200}))
    embedder = Embedder.from_folder(bare, batch_size=8, threads=1)
    assert (
        embedder.max_seq_length == 200 == embedder.model.max_seq_length == NumpyEncoder.load(bare).spec.max_seq_length
    )
