"""A sentence-transformers BERT encoder in numpy: embeds queries without importing torch.

An edge bundle embeds one query per answer. Importing torch and sentence-transformers for that costs ~10 s of a
cold start, so the bundle embeds with this encoder instead: the same BERT forward pass (embeddings, self-attention
with the padding masked, exact erf GELU, post-LayerNorm), the model's pooling, then L2 normalisation, read from the
same model folder with only numpy, `safetensors.numpy` and `tokenizers`. It matches sentence-transformers to ~1e-6
per component (float32 throughout; `tests/unit/test_edge_encoder.py` holds it to 1e-4 on the ICD-10 test phrases).

It implements what the project's embedders are (the packaged MiniLM and its fine-tuned copies): a `Transformer`
module of model type `bert`, then `Pooling` (mean or CLS), then optionally `Normalize`. Any other module, pooling,
activation or position embedding is refused with a ValueError naming the folder and what it does not implement.

Usage::

    encoder = NumpyEncoder.load(model_dir)
    vectors = encoder.embed(["typhoid endocarditis"])  # (1, 384) float32, rows of norm 1

`embed(texts, threads=1)` runs numpy's BLAS on that many threads (through threadpoolctl, which scikit-learn
brings): OpenBLAS's default, one per core, took 165 ms a query instead of 10 ms on a shared 2-core machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODULE_KINDS = ("Transformer", "Pooling", "Normalize")
"""The sentence-transformers modules the encoder implements (the last part of `modules.json`'s `type`)."""
POOLING_MODES = ("mean", "cls")
"""The poolings it implements (sentence-transformers' `pooling_mode` names)."""
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EncoderSpec:
    """What a model folder asks of the encoder, read and checked from its JSON files (no weights read).

    Attributes:
        folder: the model folder (`modules.json` lives here).
        transformer_dir: the folder of the `Transformer` module (its `config.json`, tokenizer and weights).
        pooling: `mean` or `cls`.
        max_seq_length: tokens per text, special tokens included; longer texts are truncated (as
            sentence-transformers does: `sentence_bert_config.json`, else the tokenizer's `model_max_length`
            capped at the model's `max_position_embeddings`).
        lowercase: lowercase before the tokenizer's own normaliser (`do_lower_case`).
        truncate_left: cut long texts at their start (`truncation_side: left`) instead of their end.
        layers: transformer layers.
        heads: attention heads.
        hidden: hidden size (the vector's dimension).
        layer_norm_eps: LayerNorm epsilon.
    """

    folder: Path
    transformer_dir: Path
    pooling: str
    max_seq_length: int
    lowercase: bool
    truncate_left: bool
    layers: int
    heads: int
    hidden: int
    layer_norm_eps: float

    @classmethod
    def read(cls, folder: str | Path) -> EncoderSpec:
        """Read and check a sentence-transformers model folder.

        Raises:
            ValueError: a file is missing, or the folder holds a module, pooling, architecture, activation or prompt
                the encoder does not implement (the message names the folder and the part).
        """
        folder = Path(folder)

        def refuse(what: str) -> ValueError:
            return ValueError(f"embedding model {folder}: {what}; the numpy encoder cannot embed with it")

        def read_json(path: Path, optional: bool = False) -> Any:
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8"))
            if optional:
                return {}
            raise refuse(f"{path} is missing")

        modules = read_json(folder / "modules.json")
        kinds = {}
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in MODULE_KINDS or kind in kinds:
                raise refuse(
                    f"modules.json has a {module.get('type')} module (it implements Transformer, Pooling and "
                    "optionally Normalize, once each)"
                )
            kinds[kind] = folder / module.get("path", "")
        if list(kinds)[:2] != ["Transformer", "Pooling"]:
            raise refuse(
                f"modules.json has the modules {', '.join(kinds)}; it implements Transformer, Pooling[, Normalize]"
            )
        pooling = _pooling_mode(read_json(kinds["Pooling"] / "config.json"))
        if pooling not in POOLING_MODES:
            raise refuse(f"{pooling} pooling is not implemented (it implements {', '.join(POOLING_MODES)})")
        settings = read_json(folder / "config_sentence_transformers.json", optional=True)
        prompt = (settings.get("prompts") or {}).get(settings.get("default_prompt_name") or "", "")
        if prompt:
            raise refuse(f"its default prompt {prompt!r} is not implemented")

        model_dir = kinds["Transformer"]
        module = read_json(model_dir / "sentence_bert_config.json", optional=True)
        if module.get("transformer_task", "feature-extraction") != "feature-extraction":
            raise refuse(f"transformer_task {module['transformer_task']!r} is not implemented")
        config = read_json(model_dir / "config.json")
        checks = {
            "model_type": (config.get("model_type"), "bert"),
            "hidden_act": (config.get("hidden_act"), "gelu"),
            "position_embedding_type": (config.get("position_embedding_type", "absolute"), "absolute"),
        }
        for key, (found, implemented) in checks.items():
            if found != implemented:
                raise refuse(f"config.json {key} {found!r} is not implemented (it implements {implemented!r})")
        for name in ("tokenizer.json", _WEIGHTS_FILE):
            if not (model_dir / name).is_file():
                raise refuse(f"{model_dir / name} is missing (it reads the tokenizer and weights from those files)")
        tokenizer = read_json(model_dir / "tokenizer_config.json", optional=True)
        return cls(
            folder=folder,
            transformer_dir=model_dir,
            pooling=pooling,
            max_seq_length=max_seq_length(module, tokenizer, int(config["max_position_embeddings"])),
            lowercase=bool(module.get("do_lower_case", False)),
            truncate_left=tokenizer.get("truncation_side") == "left",
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            hidden=int(config["hidden_size"]),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        )


def max_seq_length(sentence_bert: dict[str, Any], tokenizer: dict[str, Any], positions: int) -> int:
    """Tokens per text, special tokens included, where sentence-transformers truncates: `sentence_bert_config.json`'s
    `max_seq_length`, else the tokenizer's `model_max_length`, capped at the model's `max_position_embeddings`."""
    return min(int(sentence_bert.get("max_seq_length") or tokenizer.get("model_max_length") or positions), positions)


def _pooling_mode(config: dict[str, Any]) -> str:
    """The pooling of a `1_Pooling/config.json`, new (`pooling_mode`) or legacy (`pooling_mode_*_tokens`) form."""
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    if isinstance(modes, str):
        modes = [modes]
    return modes[0] if len(modes) == 1 else " + ".join(modes) or "no"


@dataclass(frozen=True)
class _Layer:
    qkv: np.ndarray  # (hidden, 3 * hidden): query, key and value projections side by side
    qkv_bias: np.ndarray
    attention_out: np.ndarray
    attention_out_bias: np.ndarray
    attention_norm: tuple[np.ndarray, np.ndarray]
    intermediate: np.ndarray
    intermediate_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    out_norm: tuple[np.ndarray, np.ndarray]


class TokenEncoder:
    """What every encoder here shares: the model's tokenizer, length-sorted batching, pooling and L2 normalisation.

    A subclass implements `_hidden`: the transformer's last hidden states of one padded batch.
    """

    def __init__(self, spec: EncoderSpec, tokenizer: Tokenizer):
        self.spec = spec
        self.dimension = spec.hidden
        self._tokenizer = tokenizer

    def embed(self, texts: Sequence[str], *, batch_size: int = 32, threads: int | None = None) -> np.ndarray:
        """Vectors of `texts`, L2-normalised, shape (len(texts), dimension), float32.

        Texts are batched by length (shortest padding) and each batch padded to its longest text; padding is masked
        out of attention and pooling, so a text's vector does not depend on its batch.

        Args:
            texts: texts to embed (each truncated to `spec.max_seq_length` tokens).
            batch_size: texts per forward pass.
            threads: threads while embedding (None: the runtime's setting as it is).
        """
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return vectors
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        with self._threads(threads):
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(encodings[i].ids) for i in batch)
                ids = np.zeros((len(batch), width), dtype=np.int64)
                types = np.zeros((len(batch), width), dtype=np.int64)
                mask = np.zeros((len(batch), width), dtype=np.float32)
                for row, i in enumerate(batch):
                    n = len(encodings[i].ids)
                    ids[row, :n], types[row, :n], mask[row, :n] = encodings[i].ids, encodings[i].type_ids, 1.0
                vectors[batch] = self._pool(self._hidden(ids, types, mask), mask)
        return vectors

    def _threads(self, count: int | None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _hidden(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden states, (batch, width, hidden) float32, of a batch's ids, token types and mask."""
        raise NotImplementedError

    def _pool(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.spec.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = (tokens * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def load_tokenizer(spec: EncoderSpec) -> Tokenizer:
    """The model's tokenizer, truncating and lowercasing as sentence-transformers does for it."""
    from tokenizers import Tokenizer
    from tokenizers.normalizers import Lowercase, Sequence

    tokenizer = Tokenizer.from_file(str(spec.transformer_dir / "tokenizer.json"))
    # tokenizer.json carries the padding and truncation it was saved with (the packaged MiniLM's: 128);
    # sentence-transformers overrides both, and so does this.
    tokenizer.no_padding()
    tokenizer.enable_truncation(spec.max_seq_length, direction="left" if spec.truncate_left else "right")
    if spec.lowercase:
        normalizer = tokenizer.normalizer
        tokenizer.normalizer = Sequence([Lowercase(), normalizer] if normalizer is not None else [Lowercase()])
    return tokenizer


def load_weights(spec: EncoderSpec) -> dict[str, np.ndarray]:
    """The transformer's weights as float32 arrays, names without the `bert.` prefix some checkpoints carry."""
    from safetensors.numpy import load_file

    weights = load_file(spec.transformer_dir / _WEIGHTS_FILE)
    return {name.removeprefix("bert."): np.ascontiguousarray(w, dtype=np.float32) for name, w in weights.items()}


class NumpyEncoder(TokenEncoder):
    """A BERT sentence-transformers model run with numpy: texts in, L2-normalised float32 vectors out.

    Use `NumpyEncoder.load(folder)`.

    Attributes:
        spec: what the folder asks for (pooling, max_seq_length, sizes).
        dimension: length of the vectors.
    """

    def __init__(self, spec: EncoderSpec, tokenizer: Tokenizer, weights: dict[str, np.ndarray]):
        super().__init__(spec, tokenizer)

        def weight(name: str) -> np.ndarray:
            found = weights.get(name)
            if found is None:
                raise ValueError(f"embedding model {spec.folder}: {_WEIGHTS_FILE} has no weight {name!r}")
            return found

        def linear(name: str) -> tuple[np.ndarray, np.ndarray]:
            # torch's Linear stores (out, in); x @ weight wants (in, out).
            return np.ascontiguousarray(weight(f"{name}.weight").T), weight(f"{name}.bias")

        def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
            return weight(f"{name}.weight"), weight(f"{name}.bias")

        self._words = weight("embeddings.word_embeddings.weight")
        self._positions = weight("embeddings.position_embeddings.weight")
        self._token_types = weight("embeddings.token_type_embeddings.weight")
        self._embedding_norm = norm("embeddings.LayerNorm")
        self._layers = []
        for i in range(spec.layers):
            prefix = f"encoder.layer.{i}"
            projections = [linear(f"{prefix}.attention.self.{part}") for part in ("query", "key", "value")]
            attention_out, attention_out_bias = linear(f"{prefix}.attention.output.dense")
            intermediate, intermediate_bias = linear(f"{prefix}.intermediate.dense")
            out, out_bias = linear(f"{prefix}.output.dense")
            self._layers.append(
                _Layer(
                    qkv=np.ascontiguousarray(np.concatenate([w for w, _ in projections], axis=1)),
                    qkv_bias=np.concatenate([b for _, b in projections]),
                    attention_out=attention_out,
                    attention_out_bias=attention_out_bias,
                    attention_norm=norm(f"{prefix}.attention.output.LayerNorm"),
                    intermediate=intermediate,
                    intermediate_bias=intermediate_bias,
                    out=out,
                    out_bias=out_bias,
                    out_norm=norm(f"{prefix}.output.LayerNorm"),
                )
            )

    @classmethod
    def load(cls, folder: str | Path) -> NumpyEncoder:
        """Load a sentence-transformers BERT model folder (`EncoderSpec.read` checks it first).

        Raises:
            ValueError: the folder holds a model the encoder does not implement, or lacks a file or weight.
        """
        spec = EncoderSpec.read(folder)
        return cls(spec, load_tokenizer(spec), load_weights(spec))

    def _threads(self, count: int | None) -> contextlib.AbstractContextManager[None]:
        return blas_threads(count)

    def _hidden(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, width = ids.shape
        heads, hidden, eps = self.spec.heads, self.spec.hidden, self.spec.layer_norm_eps
        size = hidden // heads
        x = self._words[ids] + self._positions[:width] + self._token_types[types]
        x = _layer_norm(x.reshape(batch * width, hidden), *self._embedding_norm, eps)
        # A padded key gets the lowest float32 score (as transformers masks), so its softmax weight is 0.
        padding = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(size))
        for layer in self._layers:
            qkv = (x @ layer.qkv + layer.qkv_bias).reshape(batch, width, 3, heads, size).transpose(2, 0, 3, 1, 4)
            scores = (qkv[0] * scale) @ qkv[1].transpose(0, 1, 3, 2) + padding
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ qkv[2]).transpose(0, 2, 1, 3).reshape(batch * width, hidden)
            x = _layer_norm(context @ layer.attention_out + layer.attention_out_bias + x, *layer.attention_norm, eps)
            inner = _gelu(x @ layer.intermediate + layer.intermediate_bias)
            x = _layer_norm(inner @ layer.out + layer.out_bias + x, *layer.out_norm, eps)
        return x.reshape(batch, width, hidden)


@contextlib.contextmanager
def blas_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` BLAS threads in numpy, then restore; as it is when `count` is None or
    threadpoolctl is not installed."""
    controller = _blas_controller() if count is not None else None
    if controller is None:
        yield
        return
    with controller.limit(limits=count):
        yield


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x/2 · (1 + erf(x/√2)) = x/2 · erfc(-x/√2), with erfc in float32 (scipy costs ~0.2 s to import).

    erfc is Numerical Recipes' Chebyshev fit (`erfcc`): relative error under 1.2e-7 everywhere, so the negative
    tail (where 1 + erf cancels) keeps its precision too. In place where it can be: this is a third of the forward.
    """
    z = np.abs(x)
    z *= np.float32(1 / np.sqrt(2))
    t = z * np.float32(0.5)
    t += 1
    np.reciprocal(t, out=t)
    exponent = t * np.float32(0.17087277)
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196):
        exponent += np.float32(c)
        exponent *= t
    exponent += np.float32(1.00002368)
    exponent *= t
    exponent -= np.float32(1.26551223)
    z *= z
    exponent -= z
    tail = np.exp(exponent, out=exponent)
    tail *= t  # erfc(|x|/√2)
    positive = x > 0
    tail[positive] = 2 - tail[positive]
    tail *= x
    tail *= np.float32(0.5)
    return tail
