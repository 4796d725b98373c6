"""Benchmark of the re-index engine on ICD-10-CM (the demo specialist's ~75k billable codes).

Printed side by side, in one run:

1. full index: the engine (load, hash, chunk, embed, write, build indexes, manifest) against the
   bare embedding model plus a bare LanceDB insert of the same chunks (target: >= 0.9 of bare);
2. a re-run without changes, as a fraction of the full run (target: <= 0.02);
3. a re-run after 1% of the documents changed (half edited, a quarter deleted, a quarter added),
   as a fraction of the full run (target: <= 0.03);
4. query latency p50/p95 at that size against a bare (unindexed) LanceDB search;
5. recall@10 and MRR of the demo retrieval suite (evals/suites/icd10-coder/test.jsonl).

Run from the repository root:

    OMP_NUM_THREADS=2 .venv/bin/python bench/reindex.py              # full size, several minutes
    OMP_NUM_THREADS=2 .venv/bin/python bench/reindex.py --limit 2000 # quick

`--bare-sample F` embeds only a random fraction F of the chunks for the bare baseline and scales
its time to all chunks (the full baseline doubles the run's length on a slow machine).

`--engine [ARGS]` runs the distributed engine's benchmark instead (`bench/engine.py`: the shards on 1 and 2
local Dask workers against bare one-process embedding, and a 10-million-document projection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPECIALIST = "icd10-coder"


def icd10_documents(
    change: float = 0.0, seed: int = 0, limit: int | None = None, priority_ids: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """The demo's ICD-10-CM documents, with a fraction `change` of them altered (for the re-run).

    Half of the changed share is edited, a quarter deleted, and as many new documents as a quarter
    are added. Which documents change is a pure function of (seed, id), so runs agree.
    """
    from cadre.demo.icd10 import load_documents

    produced = 0
    for document in load_documents(billable_only=True, limit=limit, priority_ids=priority_ids):
        produced += 1
        draw = int.from_bytes(hashlib.sha256(f"{seed}:{document['id']}".encode()).digest()[:8], "big") / 2**64
        if draw < change / 2:
            yield {**document, "text": document["text"] + "\nRevised in the benchmark's change set."}
        elif draw < change * 3 / 4:
            continue
        else:
            yield document
    for number in range(int(produced * change / 4)):
        yield {
            "id": f"NEW{number:05d}",
            "title": f"Benchmark condition {number}",
            "text": f"NEW{number:05d}: a condition added by the benchmark, number {number}.",
            "metadata": {"chapter": "bench"},
        }


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.percentile(samples, 50) * 1000), float(np.percentile(samples, 95) * 1000)


def timed_calls(call, items: Sequence[Any]) -> tuple[list[float], list[Any]]:
    times, results = [], []
    for item in items:
        started = time.perf_counter()
        results.append(call(item))
        times.append(time.perf_counter() - started)
    return times, results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--engine"]:
        sys.path.insert(0, str(REPO))
        from bench.engine import main as engine_main

        return engine_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="index only this many documents (test codes first)")
    parser.add_argument(
        "--threads", type=int, default=None, help="embedding threads (default: pipelines.yaml threads.embedding)"
    )
    parser.add_argument(
        "--bare-sample", type=float, default=1.0, help="fraction of chunks the bare baseline embeds (time scaled up)"
    )
    parser.add_argument("--queries", type=int, default=None, help="evaluate this many test cases (default: all)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from cadre.platform.env import OFFLINE_ENV

    os.environ.update(OFFLINE_ENV)
    from cadre.config import load_config

    config = load_config(REPO / "pipelines.yaml")
    specialist = config.specialist(SPECIALIST)
    threads = args.threads or config.project.threads.embedding
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    import lancedb
    import numpy as np
    import pyarrow as pa
    import torch
    from rich.console import Console
    from rich.table import Table

    from cadre.config.knowledge import PythonSource
    from cadre.config.project import ThreadSettings
    from cadre.evaluation import metrics
    from cadre.knowledge.embedding import Embedder, torch_threads
    from cadre.knowledge.index import open_backend
    from cadre.knowledge.reindex import IndexSearcher, plan_and_apply, promote_version

    console = Console(width=max(Console().width, 130))
    torch.set_num_threads(threads)
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="cadre-bench-"))
    cases = [
        json.loads(line)
        for line in (REPO / "evals/suites/icd10-coder/test.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if args.queries:
        cases = cases[: args.queries]
    options: dict[str, Any] = {}
    if args.limit:
        options["priority_ids"] = sorted({code for case in cases for code in case["relevant_ids"]})[: args.limit]

    def source(change):
        return PythonSource(
            kind="python",
            name="icd10cm",
            entrypoint="bench.reindex:icd10_documents",
            options={**options, "change": change},
        )

    embedder = Embedder.load(
        config.project.embedding, ThreadSettings(torch=threads, embedding=threads), root=config.root
    )
    console.print(
        f"[bold]Cadre re-index benchmark[/] · {SPECIALIST} · {args.limit or 'all'} documents · {threads} embedding threads · "
        f"{os.cpu_count()} CPUs · state {state_dir}"
    )
    with console.status("warming up (model, ICD-10-CM tables)"):
        started = time.perf_counter()
        embedder.embed(["warm up"])
        from cadre.demo.icd10 import billable_codes

        billable_codes()
        warmup_s = time.perf_counter() - started

    def files_by_inode() -> dict[int, tuple[int, bool]]:
        """Inode → (size, whether it is part of a LanceDB table) of every file of the specialist's indexes (tables,
        version manifests, build markers): a hard-linked file is one file."""
        folder = state_dir / "index" / SPECIALIST
        if not folder.exists():
            return {}
        return {
            path.stat().st_ino: (path.stat().st_size, "lancedb" in path.relative_to(folder).parts)
            for path in folder.rglob("*")
            if path.is_file()
        }

    written: dict[float, int] = {}  # bytes of new files each run wrote under the index folder
    written_tables: dict[float, int] = {}  # of them, into LanceDB tables

    def reindex(change: float):
        before = files_by_inode()
        started = time.perf_counter()
        result = plan_and_apply(
            SPECIALIST,
            [source(change)],
            specialist.chunking,
            root=REPO,
            state_dir=state_dir,
            embedder=embedder,
            max_documents=args.limit,
            show_progress=True,
        )
        elapsed = time.perf_counter() - started
        new = [(size, table) for inode, (size, table) in files_by_inode().items() if inode not in before]
        written[change] = sum(size for size, _ in new)
        written_tables[change] = sum(size for size, table in new if table)
        return result, elapsed

    console.print("full index …")
    full, full_s = reindex(0.0)
    full_written, full_table_written = written[0.0], written_tables[0.0]
    promote_version(state_dir, SPECIALIST, full.version)
    console.print("re-run, no change …")
    unchanged, unchanged_s = reindex(0.0)
    console.print("re-run, 1% changed …")
    unchanged_written, unchanged_table_written = written[0.0], written_tables[0.0]
    changed, changed_s = reindex(0.01)

    # The bare baseline: the same chunks, straight through the model and into a fresh LanceDB table.
    backend = open_backend(config.project.index, state_dir, SPECIALIST, dimension=embedder.dimension)
    engine_version = backend.open_version(full.version)
    rows = engine_version.table.search().select(["id", "record_id", "content", "vector"]).limit(None).to_arrow()
    texts = rows.column("content").to_pylist()
    sample = list(range(len(texts)))
    if args.bare_sample < 1.0:
        sample = sorted(random.Random(0).sample(sample, max(1, int(len(texts) * args.bare_sample))))
    console.print(f"bare baseline: embedding {len(sample)} of {len(texts)} chunks …")
    model = embedder.model
    with torch_threads(threads), torch.inference_mode():
        started = time.perf_counter()
        model.encode(
            [texts[i] for i in sample],
            batch_size=config.project.embedding.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        bare_embed_s = (time.perf_counter() - started) * len(texts) / len(sample)
    bare_db = lancedb.connect(str(state_dir / "bare"))
    started = time.perf_counter()
    bare_table = bare_db.create_table(
        "bare",
        pa.table(
            {
                "id": rows.column("id"),
                "record_id": rows.column("record_id"),
                "content": rows.column("content"),
                "vector": rows.column("vector"),
            }
        ),
    )
    bare_insert_s = time.perf_counter() - started
    bare_s = bare_embed_s + bare_insert_s

    # Queries: the suite's phrases.
    phrases = [case["phrase"] for case in cases]
    relevant = [case["relevant_ids"] for case in cases]
    query_times, query_vectors = timed_calls(embedder.embed_query, phrases)
    pairs = list(zip(query_vectors, phrases))
    bare_times, bare_hits = timed_calls(
        lambda pair: (
            bare_table.search(pair[0])
            .distance_type("cosine")
            .limit(10)
            .select(["record_id", "_distance"])
            .to_arrow()
            .column("record_id")
            .to_pylist()
        ),
        pairs,
    )
    vector_times, vector_hits = timed_calls(
        lambda pair: engine_version.search(pair[0], pair[1], 10, mode="vector"), pairs
    )
    hybrid_times, hybrid_hits = timed_calls(
        lambda pair: engine_version.search(pair[0], pair[1], 10, mode="hybrid"), pairs
    )
    searcher = IndexSearcher(SPECIALIST, state_dir, backend, embedder, "hybrid")
    end_to_end_times, _ = timed_calls(lambda phrase: searcher.search(phrase, 10), phrases)

    def quality(hits: list[list[str]]) -> tuple[float, float]:
        return float(np.mean(metrics.recall_at_k(hits, relevant, 10))), float(np.mean(metrics.mrr(hits, relevant)))

    vector_ids = [[hit.record_id for hit in hits] for hits in vector_hits]
    hybrid_ids = [[hit.record_id for hit in hits] for hits in hybrid_hits]
    ann_overlap = float(np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(vector_ids, bare_hits)]))

    # --- report ---------------------------------------------------------------------------------
    chunks = full.chunks_total
    engine_rate, bare_rate = chunks / full_s, chunks / bare_s
    embed_s = full.durations_s.get("embed", 0.0)
    # Noise-free view: both sides embedding at the engine's measured speed.
    same_speed_ratio = (embed_s + bare_insert_s) / full_s
    numbers: dict[str, Any] = {
        "documents": full.documents_total,
        "chunks": chunks,
        "threads": threads,
        "warmup_s": warmup_s,
        "full_s": full_s,
        "full_phases_s": full.durations_s,
        "engine_chunks_per_s": engine_rate,
        "bare_embed_s": bare_embed_s,
        "bare_insert_s": bare_insert_s,
        "bare_s": bare_s,
        "bare_chunks_per_s": bare_rate,
        "bare_sample": args.bare_sample,
        "throughput_ratio": engine_rate / bare_rate,
        "same_speed_ratio": same_speed_ratio,
        "unchanged_s": unchanged_s,
        "unchanged_fraction": unchanged_s / full_s,
        "unchanged_created_version": unchanged.created_version,
        "unchanged_embedded": unchanged.chunks_embedded,
        "unchanged_phases_s": unchanged.durations_s,
        "changed_s": changed_s,
        "changed_fraction": changed_s / full_s,
        "changed_embedded": changed.chunks_embedded,
        "changed_deleted": changed.chunks_deleted,
        "changed_documents": [changed.documents_added, changed.documents_updated, changed.documents_deleted],
        "changed_phases_s": changed.durations_s,
        "full_bytes_written": full_written,
        "unchanged_bytes_written": unchanged_written,
        "changed_bytes_written": written[0.01],
        "full_table_bytes_written": full_table_written,
        "unchanged_table_bytes_written": unchanged_table_written,
        "changed_table_bytes_written": written_tables[0.01],
        "latency_ms": {
            name: percentiles(times)
            for name, times in [
                ("query_embedding", query_times),
                ("bare_lancedb_flat", bare_times),
                ("engine_vector", vector_times),
                ("engine_hybrid", hybrid_times),
                ("engine_search_end_to_end", end_to_end_times),
            ]
        },
        "queries": len(cases),
        "recall@10_hybrid": quality(hybrid_ids)[0],
        "mrr_hybrid": quality(hybrid_ids)[1],
        "recall@10_vector": quality(vector_ids)[0],
        "mrr_vector": quality(vector_ids)[1],
        "recall@10_bare_flat": quality(bare_hits)[0],
        "mrr_bare_flat": quality(bare_hits)[1],
        "ann_overlap_with_flat@10": ann_overlap,
        "index_types": {config.columns[0]: config.index_type for config in engine_version.table.list_indices()},
    }

    table = Table(title=f"Full index · {full.documents_total} documents · {chunks} chunks")
    for column in ("", "seconds", "chunks/s", "vs bare", "target"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(
        "engine (end to end)", f"{full_s:.1f}", f"{engine_rate:.1f}", f"{engine_rate / bare_rate:.3f}", ">= 0.9"
    )
    table.add_row("engine, if bare embedded at the engine's speed", "", "", f"{same_speed_ratio:.3f}", ">= 0.9")
    table.add_row(
        f"bare model + LanceDB insert{' (sampled)' if args.bare_sample < 1 else ''}",
        f"{bare_s:.1f}",
        f"{bare_rate:.1f}",
        "1.000",
        "",
    )
    table.add_row("  bare: embed / insert", f"{bare_embed_s:.1f} / {bare_insert_s:.2f}", "", "", "")
    console.print(table)
    console.print("  engine phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in full.durations_s.items()))

    table = Table(title="Re-runs (bytes written: new files in the index folder; a hard-linked file counts once)")
    for column in (
        "",
        "seconds",
        "of full run",
        "target",
        "embedded",
        "deleted",
        "documents +/~/-",
        "MB written",
        "of it table",
    ):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(
        "no change",
        f"{unchanged_s:.2f}",
        f"{unchanged_s / full_s:.4f}",
        "<= 0.02",
        str(unchanged.chunks_embedded),
        str(unchanged.chunks_deleted),
        f"{unchanged.documents_added}/{unchanged.documents_updated}/{unchanged.documents_deleted}",
        f"{unchanged_written / 1e6:.2f} ({unchanged_written / full_written:.4f} of full)",
        f"{unchanged_table_written / 1e6:.2f} ({unchanged_table_written / full_table_written:.4f})",
    )
    table.add_row(
        "1% changed",
        f"{changed_s:.2f}",
        f"{changed_s / full_s:.4f}",
        "<= 0.03",
        str(changed.chunks_embedded),
        str(changed.chunks_deleted),
        f"{changed.documents_added}/{changed.documents_updated}/{changed.documents_deleted}",
        f"{written[0.01] / 1e6:.2f} ({written[0.01] / full_written:.4f} of full)",
        f"{written_tables[0.01] / 1e6:.2f} ({written_tables[0.01] / full_table_written:.4f})",
    )
    console.print(table)
    console.print(
        f"  full index wrote {full_written / 1e6:.1f} MB, {full_table_written / 1e6:.1f} MB of it into the LanceDB "
        "table; the rest is the version's manifest (every chunk's id and hash: whole for the first version, a "
        "version built from another stores its difference)"
    )
    console.print("  no change phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in unchanged.durations_s.items()))
    console.print("  1% changed phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in changed.durations_s.items()))

    table = Table(
        title=f"Query latency · {len(cases)} queries · k=10 · {chunks} chunks · indexes {numbers['index_types']}"
    )
    for column in ("", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column else "left")
    labels = {
        "bare_lancedb_flat": "bare LanceDB vector search (no index)",
        "engine_vector": "engine vector search",
        "engine_hybrid": "engine hybrid search (vector + BM25, RRF)",
        "query_embedding": "query embedding (MiniLM)",
        "engine_search_end_to_end": "engine search() end to end (embed + hybrid)",
    }
    for name, (p50, p95) in numbers["latency_ms"].items():
        table.add_row(labels[name], f"{p50:.1f}", f"{p95:.1f}")
    console.print(table)

    table = Table(title="Retrieval quality · evals/suites/icd10-coder/test.jsonl")
    for column in ("", "recall@10", "MRR"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("engine hybrid (default)", f"{numbers['recall@10_hybrid']:.3f}", f"{numbers['mrr_hybrid']:.3f}")
    table.add_row("engine vector (ANN)", f"{numbers['recall@10_vector']:.3f}", f"{numbers['mrr_vector']:.3f}")
    table.add_row(
        "bare LanceDB vector (exact)", f"{numbers['recall@10_bare_flat']:.3f}", f"{numbers['mrr_bare_flat']:.3f}"
    )
    table.add_row("ANN top-10 overlap with exact", f"{ann_overlap:.3f}", "")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
