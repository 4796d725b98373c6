"""ONNX Runtime for the embedding model: the same BERT forward pass, exported once, in fp32 or int8.

`project.embedding.runtime: onnx` (or `onnx-int8`) runs the embedder through ONNX Runtime instead of torch for
every stage that embeds (the re-index, the searcher of serving and evaluation). The graph is exported from the
model folder's own weights, never downloaded: `_BertGraph` is the forward pass `cadre.edge.encoder.NumpyEncoder`
implements (embeddings, masked self-attention, exact GELU, post-LayerNorm), written in torch only to be traced by
`torch.onnx.export`; tokenizing, pooling and normalising are the encoder's (`TokenEncoder`). `onnx-int8` quantizes
the weights of that graph to int8 per output channel (`onnxruntime.quantization.quantize_dynamic`).

Exports are cached per model fingerprint under `CADRE_ONNX_CACHE` (default `~/.cache/cadre/onnx`), written to a
temporary file and renamed, so concurrent processes never read half a file. fp32 matches sentence-transformers to
~1e-5 per component; int8 changes vectors more, so `bench/embed.py` measures recall@10 of each runtime beside
torch's on the specialist's test split before you choose it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cadre.edge.encoder import EncoderSpec, TokenEncoder, load_tokenizer, load_weights

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

ONNX_RUNTIMES = ("onnx", "onnx-int8")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17
_RECIPE = "r2"
"""Changes when the export or the quantization changes, so a cache of an older recipe is not read."""


def onnx_cache_dir() -> Path:
    """Where exported graphs are kept: `CADRE_ONNX_CACHE`, else `~/.cache/cadre/onnx`."""
    return Path(os.environ.get("CADRE_ONNX_CACHE") or Path.home() / ".cache" / "cadre" / "onnx")


def onnx_file(spec: EncoderSpec, fingerprint: str, int8: bool) -> Path:
    """The exported graph of the model (fp32, or int8 weights), exported now if it is not cached yet."""
    folder = onnx_cache_dir() / fingerprint / _RECIPE
    target = folder / ("model-int8.onnx" if int8 else "model.onnx")
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        logger.info("exporting %s to ONNX (once per model) into %s", spec.folder, folder)
        _atomic(fp32, lambda tmp: _export(spec, tmp))
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logger.info("quantizing %s to int8", fp32)
        # Per output channel: one scale per row keeps MiniLM's vectors at cosine ~0.99 of fp32 (~0.95 per tensor).
        _atomic(
            target,
            lambda tmp: quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True),
        )
    return target


def _atomic(target: Path, write: Any) -> None:
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".onnx")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def _export(spec: EncoderSpec, path: Path) -> None:
    import torch

    graph = _bert_graph(spec, load_weights(spec))
    ids = torch.ones(2, 16, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.float32)
    mask[1, 10:] = 0
    with torch.inference_mode():
        torch.onnx.export(
            graph,
            (ids, mask, torch.zeros_like(ids)),
            str(path),
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={name: {0: "batch", 1: "width"} for name in (*_INPUTS, "last_hidden_state")},
            opset_version=_OPSET,
            dynamo=False,
        )


def _bert_graph(spec: EncoderSpec, weights: dict[str, np.ndarray]) -> Any:
    """The BERT forward pass as a torch module over the model's weights, for export only."""
    import torch
    from torch.nn import functional

    hidden, heads, eps = spec.hidden, spec.heads, spec.layer_norm_eps
    size = hidden // heads

    class _BertGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = {name: name.replace(".", "__") for name in weights}
            for name, key in self.names.items():
                self.register_buffer(key, torch.from_numpy(weights[name].copy()))

        def w(self, name: str) -> torch.Tensor:
            return getattr(self, self.names[name])

        def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
            return functional.linear(x, self.w(f"{name}.weight"), self.w(f"{name}.bias"))

        def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
            return functional.layer_norm(x, (hidden,), self.w(f"{name}.weight"), self.w(f"{name}.bias"), eps)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
            batch, width = input_ids.shape
            positions = torch.arange(width)
            x = (
                self.w("embeddings.word_embeddings.weight")[input_ids]
                + self.w("embeddings.position_embeddings.weight")[positions][None]
                + self.w("embeddings.token_type_embeddings.weight")[token_type_ids]
            )
            x = self.norm(x, "embeddings.LayerNorm")
            padding = ((1.0 - attention_mask) * torch.finfo(torch.float32).min)[:, None, None, :]
            for i in range(spec.layers):
                prefix = f"encoder.layer.{i}"

                def split(t: torch.Tensor) -> torch.Tensor:
                    return t.view(batch, width, heads, size).transpose(1, 2)

                q, k, v = (
                    split(self.linear(x, f"{prefix}.attention.self.{part}")) for part in ("query", "key", "value")
                )
                scores = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / size**0.5) + padding, dim=-1)
                context = (scores @ v).transpose(1, 2).reshape(batch, width, hidden)
                x = self.norm(
                    self.linear(context, f"{prefix}.attention.output.dense") + x, f"{prefix}.attention.output.LayerNorm"
                )
                inner = functional.gelu(self.linear(x, f"{prefix}.intermediate.dense"))
                x = self.norm(self.linear(inner, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")
            return x

    return _BertGraph().eval()


class OnnxEncoder(TokenEncoder):
    """A BERT sentence-transformers model run by ONNX Runtime (fp32 or int8 weights); see the module docstring.

    Use `OnnxEncoder.load(folder, fingerprint, int8=..., threads=...)`.
    """

    def __init__(self, spec: EncoderSpec, tokenizer: Tokenizer, session: Any):
        super().__init__(spec, tokenizer)
        self._session = session

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str, *, int8: bool, threads: int) -> OnnxEncoder:
        """The encoder of a model folder, its graph exported first if not cached; `threads` for ONNX Runtime.

        Raises:
            ValueError: the folder holds a model the encoder does not implement (see `EncoderSpec.read`).
        """
        import onnxruntime

        spec = EncoderSpec.read(folder)
        path = onnx_file(spec, fingerprint, int8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(spec, load_tokenizer(spec), session)

    def _hidden(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return self._session.run(None, feed)[0]
