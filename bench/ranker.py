"""Benchmark: the learned ranking (`search_mode: learned`) beside LanceDB's own hybrid search, same index, same cases.

On the first N cases of a split, searched in one index version (default: the live one) with its queries embedded once:

- **bare LanceDB hybrid**: `table.search(query_type="hybrid")` with LanceDB's `RRFReranker`, the library's own way
  of fusing the vector and BM25 rankings (what a user stitching LanceDB by hand would run);
- **cadre hybrid**: Cadre's fused ranking (the same reciprocal-rank fusion, ties broken by chunk id);
- **cadre learned**: the version's fitted ranker over both rankings (`cadre.knowledge.ranker`); with `--fit` (or when
  the version has none) it is fitted here first, on the train split, as the flows fit it, and the fit is timed.

Prints, per row: top-1 (exact match of the first document) and recall@10 with 95 % bootstrap intervals, the paired
difference of top-1 against the bare library, and the search latency p50/p95 (embedding excluded: the same vectors
for every row) with its ratio to the bare library's.

Run (needs an index: `cadre run reindex -s icd10-coder` first; 300 cases take about a minute):

    OMP_NUM_THREADS=2 .venv/bin/python bench/ranker.py --split test --cases 300 [--version V] [--fit]
        [--config other/pipelines.yaml] [--specialist icd10-coder] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cadre.config import load_config
from cadre.config.budget import plan_reindex
from cadre.evaluation.results import bootstrap_intervals, load_cases, paired_bootstrap_interval
from cadre.knowledge.ranker import Rankings
from cadre.knowledge.reindex import IndexSearcher, live_version
from cadre.runtime.retrieval import retrieval_query

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "pipelines.yaml"), help="the pipelines file")
    parser.add_argument("--specialist", default="icd10-coder")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--version", default=None, help="index version (default: the live one)")
    parser.add_argument("--fit", action="store_true", help="fit the version's ranker here first (timed)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    config = load_config(args.config)
    settings = config.specialist(args.specialist)
    version = args.version or live_version(config.state_dir, args.specialist)
    if version is None:
        raise SystemExit(f"{args.specialist} has no live index: run `cadre run reindex -s {args.specialist}` first")
    searcher = IndexSearcher.from_config(config, args.specialist)
    fit_seconds = None
    if args.fit or searcher.ranker_for(version) is None:
        fit_seconds = _fit(config, args.specialist, version)
        searcher = IndexSearcher.from_config(config, args.specialist)
    ranker = searcher.ranker_for(version)
    if ranker is None:
        raise SystemExit(f"no ranker could be fitted for {version}: see the warning above")

    inputs = [field.name for field in settings.program.inputs]
    cases = [c for c in load_cases(config.resolve(settings.evaluation.suite), args.split) if c.get("relevant_ids")]
    cases = cases[: args.cases]
    queries = [retrieval_query(case, inputs) for case in cases]
    vectors = searcher.embedder_for(version).embed(queries)
    handle = searcher.backend.open_version(version)
    table = handle.table

    from lancedb.rerankers import RRFReranker

    reranker = RRFReranker()

    def bare(query: str, vector: np.ndarray) -> list[str]:
        rows = (
            table.search(query_type="hybrid", vector_column_name="vector", fts_columns="content")
            .vector(vector)
            .text(query)
            .rerank(reranker)
            .select(["record_id"])
            .limit(20)
            .to_arrow()
            .to_pylist()
        )
        return [row["record_id"] for row in rows]

    def fused(query: str, vector: np.ndarray) -> list[str]:
        return [hit.record_id for hit in handle.search(vector, query, 20, mode="hybrid")]

    def learned(query: str, vector: np.ndarray) -> list[str]:
        return [
            hit.record_id
            for hit in ranker.rank(query, Rankings(*handle.rankings(vector, query, ranker.settings.fetch_depth)))
        ]

    rows = {}
    for name, search in (
        ("bare LanceDB hybrid (RRFReranker)", bare),
        ("cadre hybrid", fused),
        ("cadre learned", learned),
    ):
        search(queries[0], vectors[0])  # warm
        found, seconds = [], []
        for query, vector in zip(queries, vectors, strict=True):
            started = time.perf_counter()
            found.append(list(dict.fromkeys(search(query, vector))))
            seconds.append(time.perf_counter() - started)
        relevant = [set(case["relevant_ids"]) for case in cases]
        top1 = [float(bool(ids) and ids[0] in rel) for ids, rel in zip(found, relevant, strict=True)]
        recall10 = [float(bool(set(ids[:10]) & rel)) for ids, rel in zip(found, relevant, strict=True)]
        rows[name] = {"top1": top1, "recall@10": recall10, "ms": [s * 1000 for s in seconds]}

    base_name = next(iter(rows))
    base = rows[base_name]
    print(
        f"\n{args.specialist}: {len(cases)} {args.split} cases, index {version}"
        + (f"; ranker fitted here in {fit_seconds:.1f} s" if fit_seconds is not None else "")
    )
    print(
        f"ranker: fitted on {ranker.fitted_on.get('usable')} of {ranker.fitted_on.get('queries')} train cases, "
        f"{len(ranker.vocabulary)} title words, depth {ranker.settings.depth}"
    )
    print(
        f"{'search':36s} {'top-1 [95 %]':22s} {'Δ top-1 vs bare':22s} {'recall@10 [95 %]':22s} p50/p95 ms   ratio p50"
    )
    figures = {}
    for name, row in rows.items():
        intervals = bootstrap_intervals({"top1": row["top1"], "recall": row["recall@10"]})
        delta = np.mean(row["top1"]) - np.mean(base["top1"])
        low, high = paired_bootstrap_interval("top1", row["top1"], base["top1"])
        p50, p95 = statistics.median(row["ms"]), float(np.percentile(row["ms"], 95))
        ratio = p50 / statistics.median(base["ms"])
        print(
            f"{name:36s} {np.mean(row['top1']):.3f} [{intervals['top1'][0]:.3f}, {intervals['top1'][1]:.3f}]   "
            f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]   "
            f"{np.mean(row['recall@10']):.3f} [{intervals['recall'][0]:.3f}, {intervals['recall'][1]:.3f}]   "
            f"{p50:5.1f}/{p95:5.1f}   {ratio:.2f}×"
        )
        figures[name] = {
            "top1": float(np.mean(row["top1"])),
            "top1_interval": intervals["top1"],
            "delta_top1_vs_bare": [float(delta), low, high],
            "recall@10": float(np.mean(row["recall@10"])),
            "p50_ms": p50,
            "p95_ms": p95,
            "p50_ratio_vs_bare": ratio,
        }
    if args.out:
        Path(args.out).write_text(json.dumps({"version": version, "cases": len(cases), "rows": figures}, indent=1))


def _fit(config, specialist: str, version: str) -> float:
    from prefect.logging import disable_run_logger

    from tasks.reindex import fit_index_ranker

    started = time.perf_counter()
    with disable_run_logger():
        fitted = fit_index_ranker.fn(config, specialist, version, plan_reindex(config.specialist(specialist), "full"))
    print(f"fitted: {fitted}")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
