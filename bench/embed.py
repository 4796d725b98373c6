"""Benchmark: embedding runtimes (torch, ONNX fp32, ONNX int8) against bare sentence-transformers fp32, side by side.

On the same documents (the ICD-10-CM codes the test cases need, then their neighbours in classification order, up to
`--documents`), each runtime embeds every document text and the test phrases; an exact nearest-neighbour search over
those vectors gives recall@1 and recall@10 of the test split. Reported per runtime: documents/s (after one warm-up
batch; the ONNX export and quantization are done once before timing and cached), the ratio to bare
sentence-transformers, recall@10 and its difference from bare (the issue keeps a runtime only within 0.01), and
the largest difference of any vector component from bare.

- `bare sentence-transformers`: `SentenceTransformer(...).encode(...)` in fp32, the library alone.
- `cadre torch`, `cadre onnx`, `cadre onnx-int8`: `cadre.knowledge.embedding.Embedder` with
  `project.embedding.runtime` set to each (what the re-index and every searcher call).

Run: `OMP_NUM_THREADS=2 .venv/bin/python bench/embed.py [--documents 4000] [--cases 300] [--threads 2]`
(about 2-4 minutes on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

console = Console(width=140)


def _recall(documents: np.ndarray, queries: np.ndarray, ids: list[str], gold: list[str], k: int) -> float:
    scores = queries @ documents.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([gold[i] in {ids[j] for j in row} for i, row in enumerate(top)]))


def _timed(embed, texts: list[str], batch: int) -> tuple[np.ndarray, float]:
    embed(texts[:batch])  # warm-up: allocations, first-call costs
    started = time.perf_counter()
    vectors = embed(texts)
    return vectors, len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=4000, help="documents embedded by each runtime")
    parser.add_argument("--cases", type=int, default=300, help="test cases whose recall is measured")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from cadre.config import load_config
    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.demo.icd10 import load_documents
    from cadre.evaluation.results import load_cases
    from cadre.knowledge.embedding import Embedder, resolve_model_path

    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "pipelines.yaml")
    settings = config.specialist("icd10-coder")
    cases = load_cases(config.resolve(settings.evaluation.suite), "test", args.cases)
    gold = [case["code"] for case in cases]
    documents = list(load_documents(limit=args.documents, priority_ids=gold))
    ids = [doc["id"] for doc in documents]
    texts = [doc["text"] for doc in documents]
    phrases = [case["phrase"] for case in cases]
    batch = config.project.embedding.batch_size
    model_dir = resolve_model_path(config.project.embedding.model, config.root)
    console.print(
        f"[bold]Embedding runtimes[/bold]: {config.project.embedding.model}, {len(texts)} documents, {len(phrases)} "
        f"test phrases, batch {batch}, {args.threads} threads"
    )

    from sentence_transformers import SentenceTransformer

    bare_model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)

    def bare(items: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return bare_model.encode(items, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)

    runs: dict[str, tuple] = {}
    doc_vectors, rate = _timed(bare, texts, batch)
    runs["bare sentence-transformers (fp32)"] = (doc_vectors, rate, bare(phrases))
    for runtime in ("torch", "onnx", "onnx-int8"):
        embedder = Embedder.load(
            EmbeddingSettings(model=str(model_dir), batch_size=batch, runtime=runtime),
            ThreadSettings(torch=args.threads, embedding=args.threads),
        )
        console.print(f"  {runtime} …")
        embedder.embed(texts[:2])  # loads the model (exports and quantizes the ONNX graph once, cached)
        doc_vectors, rate = _timed(embedder.embed, texts, batch)
        runs[f"cadre {runtime}"] = (doc_vectors, rate, embedder.embed(phrases))

    reference_docs, reference_rate, reference_queries = runs["bare sentence-transformers (fp32)"]
    reference_recall = _recall(reference_docs, reference_queries, ids, gold, 10)
    table = Table(title="documents/s and test recall of each runtime on the same documents (exact kNN)")
    for column in ("runtime", "docs/s", "× bare", "recall@1", "recall@10", "Δ recall@10", "max |Δ component|"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for name, (doc_vectors, rate, queries) in runs.items():
        recall10 = _recall(doc_vectors, queries, ids, gold, 10)
        table.add_row(
            name,
            f"{rate:.0f}",
            f"{rate / reference_rate:.2f}",
            f"{_recall(doc_vectors, queries, ids, gold, 1):.3f}",
            f"{recall10:.3f}",
            f"{recall10 - reference_recall:+.3f}",
            f"{np.abs(doc_vectors - reference_docs).max():.1e}",
        )
    console.print(table)
    console.print(
        "A runtime is worth choosing where its Δ recall@10 stays within 0.01 of bare fp32; `project.embedding.runtime` "
        "sets it for every stage. A change to or from int8 re-embeds the index from empty (its precision is part of "
        "the index key)."
    )


if __name__ == "__main__":
    main()
