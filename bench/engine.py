"""Benchmark of the distributed engine (`project.engine`) on ICD-10-CM's chunks, side by side in one run.

1. The re-index with its shards on a local Dask cluster of 1 and of 2 worker processes (1 thread each, through
   Prefect's Dask task runner: each shard a task run), and inline (the default engine) at 2 threads, against the
   bare model embedding the same shards one after another in one process at 1 thread. Ours does the whole re-index
   (load, chunk, embed, write, indexes, manifest) and pays for starting the cluster and loading the model in every
   worker; the bare side embeds only.
2. The same 2-worker embedding through bare Dask (`Client.map`, no Prefect) and, when `ray` is installed, bare Ray
   (remote tasks): what Prefect's layer costs, and Dask against Ray.
3. Startup and per-task cost of each engine: cluster start, and 40 empty tasks.
4. A projection, from the measured per-worker throughput, of a 10-million-document corpus on N workers.
5. Evaluating many cases (`--cases N`): the ICD specialist's declared program as it serves (retrieval from the index
   built in 1, llama.cpp on the packaged GGUF) on N test cases, in this process at 1 and 2 threads and in shards on
   a local cluster of 1 and 2 one-thread workers (`cadre.prompts.served`), against bare llama-cpp-python completing
   the same prompts (recorded from our run) one after another in one process. Every run must give the same answers.
   `--evaluation-only` runs this section alone.

Run from the repository root (a Prefect server is started for the run unless PREFECT_API_URL is set):

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine.py --documents 3000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALIST = "icd10-coder"


def embed_texts(embedder, texts: list[str]):
    """Bare worker function (Dask, Ray): the model loads once per worker process, as in `embed_shard`."""
    return embedder.embed(texts)


def empty(_: int) -> int:
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=3000, help="ICD-10-CM documents to index")
    parser.add_argument("--shard", type=int, default=1024, help="chunks per shard")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray even when it is installed")
    parser.add_argument("--cases", type=int, default=40, help="test cases of the evaluation section (0: skip it)")
    parser.add_argument(
        "--evaluation-only", action="store_true", help="section 5 alone (its index built inline, not measured)"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from cadre.platform.env import OFFLINE_ENV

    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # (the shards run outside a flow here)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the tables, not a line per task run
    import dataclasses
    import logging

    import distributed  # noqa: F401 (its loggers exist once imported)
    import prefect  # noqa: F401

    for name in ("distributed", "prefect"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch
    from rich.console import Console
    from rich.table import Table

    from cadre.config import load_config
    from cadre.config.knowledge import PythonSource
    from cadre.config.project import EngineSettings, ThreadSettings
    from cadre.knowledge.chunking import Chunker, load_tokenizer
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.reindex import plan_and_apply
    from cadre.knowledge.sources import SkipReport, load_documents

    torch.set_num_threads(1)
    console = Console(width=max(Console().width, 120))
    config = load_config(REPO / "pipelines.yaml")
    chunking = config.specialist(SPECIALIST).chunking
    embedder = Embedder.load(config.project.embedding, ThreadSettings(torch=1, embedding=1), root=config.root)
    from cadre.evaluation.results import load_cases

    suite = config.resolve(config.specialist(SPECIALIST).evaluation.suite)
    cases = load_cases(suite, "test", args.cases) if args.cases else []
    codes = sorted({code for case in cases for code in case["relevant_ids"]})  # indexed first: the cases can hit
    source = PythonSource(
        kind="python", name="icd10cm", entrypoint="bench.reindex:icd10_documents", options={"priority_ids": codes}
    )
    documents = list(
        load_documents(
            [source],
            root=REPO,
            max_document_bytes=chunking.max_document_bytes,
            skips=SkipReport(),
            limit_per_source=args.documents,
        )
    )
    chunks = [c for cs in Chunker(load_tokenizer(embedder.model_dir), chunking).chunk_many(documents) for c in cs]
    texts = [chunk.content for chunk in chunks]
    shards = [texts[i : i + args.shard] for i in range(0, len(texts), args.shard)]
    console.print(
        f"[bold]Cadre engine benchmark[/] · {len(documents)} ICD-10-CM documents · {len(texts)} chunks · "
        f"{len(shards)} shards of {args.shard} · 1 thread per worker · {os.cpu_count()} CPUs"
    )

    with ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            from prefect.testing.utilities import prefect_test_harness

            with console.status("starting a Prefect server for the task runs"):
                stack.enter_context(prefect_test_harness(server_startup_timeout=180))
        rows: list[tuple[str, float, str]] = []

        def reindex(engine: EngineSettings, threads: int):
            """The whole re-index into a fresh state dir; (seconds, its result, the state dir)."""
            state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cadre-engine-")))
            started = time.perf_counter()
            result = plan_and_apply(
                SPECIALIST,
                [source],
                chunking,
                root=REPO,
                state_dir=state,
                embedder=dataclasses.replace(embedder, threads=threads),
                max_documents=args.documents,
                write_batch_size=args.shard,
                engine=engine,
            )
            assert result.chunks_embedded == len(texts), (result.chunks_embedded, len(texts))
            return time.perf_counter() - started, result, state

        if args.evaluation_only and cases:
            with console.status("building the index inline"):
                _, result, state = reindex(EngineSettings(), 2)
            print_evaluation(console, len(cases), evaluation_rows(console, config, cases, state, result.version))
            return 0

        def bare() -> float:
            with console.status("bare: one process, the shards one after another"):
                embedder.embed(["warm up"])
                started = time.perf_counter()
                for shard in shards:
                    embedder.embed(shard)
                return time.perf_counter() - started

        bare_s = bare()
        rows.append(("bare sentence-transformers, 1 process, 1 thread (embedding only)", bare_s, "model loaded; first"))

        with console.status("ours: the re-index inline (the default engine), 2 threads"):
            inline_s, _, _ = reindex(EngineSettings(), 2)
        rows.append(("ours: re-index inline, 1 process, 2 threads (the default engine)", inline_s, "whole run"))

        per_worker: dict[int, float] = {}
        for workers in (1, 2):
            with console.status(f"ours: the re-index, {workers} Dask worker(s) through Prefect"):
                elapsed, result, state = reindex(EngineSettings(backend="dask", workers=workers), 1)
            per_worker[workers] = elapsed
            built = (state, result.version)
            rows.append(
                (
                    f"ours: re-index, {workers} local Dask worker{'s' * (workers > 1)} via Prefect (whole run)",
                    elapsed,
                    f"embed+wait {result.durations_s.get('embed', 0):.1f} s, cluster start and model loads included",
                )
            )

        overhead: list[tuple[str, float, float]] = []
        worker_embedder = dataclasses.replace(embedder, threads=1)
        from distributed import Client, LocalCluster

        with console.status("bare Dask: 2 workers, Client.map"):
            started = time.perf_counter()
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                with Client(cluster) as client:
                    start_s = time.perf_counter() - started
                    t = time.perf_counter()
                    client.gather(client.map(empty, range(40), pure=False))
                    empty_s = time.perf_counter() - t
                    t = time.perf_counter()
                    client.gather(client.map(embed_texts, [worker_embedder] * len(shards), shards, pure=False))
                    dask_embed_s = time.perf_counter() - t
            dask_s = time.perf_counter() - started
        rows.append(("bare Dask, 2 workers (no Prefect)", dask_s, f"of which embedding {dask_embed_s:.1f} s"))
        overhead.append(("Dask (LocalCluster, 2 processes)", start_s, empty_s))

        with console.status("Prefect's Dask task runner: 40 empty task runs"):
            from prefect import task
            from prefect.cache_policies import NO_CACHE
            from prefect_dask import DaskTaskRunner

            empty_task = task(empty, name="empty", cache_policy=NO_CACHE, persist_result=False)
            started = time.perf_counter()
            with DaskTaskRunner(
                cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
            ) as runner:
                runner.client  # noqa: B018 (starts the cluster)
                start_s = time.perf_counter() - started
                t = time.perf_counter()
                for future in [runner.submit(empty_task, {"_": n}) for n in range(40)]:
                    future.result()
                empty_s = time.perf_counter() - t
        overhead.append(("Prefect task runs on Dask (prefect-dask)", start_s, empty_s))

        try:
            if args.no_ray:
                raise ImportError
            import ray
        except ImportError:
            ray = None
            rows.append(("bare Ray, 2 workers", float("nan"), "not measured: pip install ray"))
        if ray is not None:
            with console.status("bare Ray: 2 workers, remote tasks"):
                started = time.perf_counter()
                ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                remote_empty = ray.remote(num_cpus=1)(empty)
                ray.get(remote_empty.remote(0))
                start_s = time.perf_counter() - started
                t = time.perf_counter()
                ray.get([remote_empty.remote(n) for n in range(40)])
                empty_s = time.perf_counter() - t
                remote_embed = ray.remote(num_cpus=1)(embed_texts)
                t = time.perf_counter()
                ray.get([remote_embed.remote(worker_embedder, shard) for shard in shards])
                ray_embed_s = time.perf_counter() - t
                ray_s = time.perf_counter() - started
                ray.shutdown()
            rows.append(("bare Ray, 2 workers", ray_s, f"of which embedding {ray_embed_s:.1f} s"))
            overhead.append(("Ray (ray.init, 2 CPUs)", start_s, empty_s))

        evaluated = evaluation_rows(console, config, cases, *built) if cases else None

        bare_again_s = bare()
        rows.append(
            (
                "bare again, at the end (the machine's drift over the run)",
                bare_again_s,
                "speed-ups above are against the first",
            )
        )

    table = Table(title=f"Embedding {len(texts)} chunks in {len(shards)} shards (one run, side by side)")
    for column in ("system", "wall s", "chunks/s", "speed-up vs bare", "note"):
        table.add_column(column, justify="left" if column in ("system", "note") else "right")
    for name, seconds, note in rows:
        ok = seconds == seconds
        table.add_row(
            name,
            f"{seconds:.1f}" if ok else "–",
            f"{len(texts) / seconds:.0f}" if ok else "–",
            f"{bare_s / seconds:.2f}×" if ok else "–",
            note,
        )
    console.print(table)
    console.print(
        f"2 workers against 1 (ours): [bold]{per_worker[1] / per_worker[2]:.2f}×[/]; 2 one-thread workers against "
        f"inline at 2 threads: [bold]{inline_s / per_worker[2]:.2f}×[/]; each worker embeds "
        f"{len(texts) / bare_s:.0f} chunks/s at 1 thread"
    )

    costs = Table(title="What an engine costs before it embeds")
    for column in ("engine", "start s", "40 empty tasks s", "per task ms"):
        costs.add_column(column, justify="left" if column == "engine" else "right")
    for name, start_s, empty_s in overhead:
        costs.add_row(name, f"{start_s:.2f}", f"{empty_s:.2f}", f"{empty_s / 40 * 1000:.1f}")
    console.print(costs)

    # The projection: the measured single-thread throughput per worker, the measured chunks per document, and the
    # 2-worker run's efficiency (its speed-up over 1 worker, per worker) held constant.
    chunks_per_document = len(texts) / len(documents)
    rate = len(texts) / bare_s
    efficiency = per_worker[1] / per_worker[2] / 2
    projection = Table(title="Projection: 10 million documents (measured rates; efficiency of 2 workers kept)")
    for column in ("workers (1 thread each)", "chunks", "hours"):
        projection.add_column(column, justify="right")
    total_chunks = 10_000_000 * chunks_per_document
    for workers in (1, 2, 16, 64, 256):
        hours = total_chunks / (rate * (1 if workers == 1 else workers * efficiency)) / 3600
        projection.add_row(str(workers), f"{total_chunks:,.0f}", f"{hours:,.1f}")
    console.print(projection)
    console.print(
        f"(chunks per document {chunks_per_document:.2f}, {rate:.0f} chunks/s per worker, 2-worker efficiency "
        f"{efficiency:.2f}; a GPU worker was not measured here: no GPU on this machine)"
    )
    if evaluated is not None:
        print_evaluation(console, len(cases), evaluated)
    return 0


def evaluation_rows(console, config, cases: list[dict], state: Path, version: str) -> list[tuple[str, float, str]]:
    """Section 5: the same test cases evaluated by bare llama.cpp, and by ours inline and on 1 and 2 workers.

    Returns (system, wall seconds, note) rows; raises if any run's answers differ from the first run's.
    """
    from llama_cpp import Llama

    from cadre.config.project import EngineSettings, ThreadSettings
    from cadre.prompts.optimize import evaluate_program
    from cadre.prompts.served import ServedRun, open_evaluator, open_served
    from cadre.registry.champions import ServingSetup
    from cadre.runtime.base_model import BaseModelFiles, ensure_gguf
    from cadre.runtime.retrieval import IndexTarget

    settings = config.specialist(SPECIALIST)
    index = IndexTarget(
        SPECIALIST, str(state), str(config.root), config.project.index, config.project.embedding,
        ThreadSettings(torch=1, embedding=1), search_mode=settings.index.search_mode, version=version,
    )  # fmt: skip
    gguf = str(ensure_gguf(config))
    base = BaseModelFiles("gemma3-270m", "", gguf, "gemma3-270m")

    def setup(threads: int) -> ServingSetup:
        return ServingSetup(settings.program, None, index, base, None, None, threads, config.project.lm.n_ctx)

    rows: list[tuple[str, float, str]] = []
    answers: dict[str, list] = {}
    cache = Path(tempfile.mkdtemp(prefix="cadre-engine-cache-"))  # a fresh cache per run: every answer computed

    # Ours, inline at 1 thread, recording the prompts it sends (the bare side completes the same prompts).
    recorded: list[tuple[str, dict]] = []
    with console.status(f"ours: {len(cases)} cases in this process, 1 thread"):
        started = time.perf_counter()
        program, lm = open_served(ServedRun(setup(1), None, None, 1, str(cache / "inline-1")))

        class Recording:
            def __init__(self, client):
                self.client = client

            def complete(self, prompt: str, **options):
                recorded.append((prompt, options))
                return self.client.complete(prompt, **options)

            def score(self, *arguments, **options):  # (the declared program answers freely: never called)
                return self.client.score(*arguments, **options)

        lm.client = Recording(lm.client)
        run = evaluate_program(program, settings.program, settings.evaluation, lm, cases, "inline-1")
        rows.append(("ours: in this process, 1 thread", time.perf_counter() - started, "model load included"))
        answers["inline-1"] = [e.output for e in run.result.examples]
        del program, lm

    for threads in (1, 2):
        with console.status(f"bare llama-cpp-python: the recorded prompts, {threads} thread(s)"):
            started = time.perf_counter()
            llm = Llama(model_path=gguf, n_ctx=config.project.lm.n_ctx, n_threads=threads, n_threads_batch=threads,
                        seed=0, verbose=False)  # fmt: skip
            for prompt, options in recorded:
                llm.reset()
                llm.create_completion(prompt, max_tokens=options["max_tokens"], stop=options["stop"], temperature=0.0)
            rows.append(
                (
                    f"bare llama-cpp-python, 1 process, {threads} thread{'s' * (threads > 1)} (LM only)",
                    time.perf_counter() - started,
                    "prompts given: no retrieval, no prompt building, no scoring",
                )
            )
            del llm

    runs = [("inline-2", None, 2), ("dask-1", EngineSettings(backend="dask", workers=1), 1)]
    runs.append(("dask-2", EngineSettings(backend="dask", workers=2), 1))
    for name, engine, threads in runs:
        where = "this process, 2 threads" if engine is None else f"{engine.workers} local Dask worker(s), 1 thread each"
        with console.status(f"ours: {len(cases)} cases, {where}"):
            started = time.perf_counter()
            with open_evaluator(engine, str(cache / name)) as evaluator:
                run = evaluator.evaluate(setup(threads), settings.evaluation, cases, None, None, name)
            note = "" if engine is None else "cluster start and a model load per worker included"
            rows.append((f"ours: {where}", time.perf_counter() - started, note))
            answers[name] = [e.output for e in run.result.examples]
            assert run.usage.calls == len(cases), f"{name}: {run.usage.cache_hits} answers came from a cache"
    differing = {name: sum(a != b for a, b in zip(got, answers["inline-1"])) for name, got in answers.items()}
    if any(differing.values()):
        raise AssertionError(f"answers differ from the 1-thread run: {differing}")
    return rows


def print_evaluation(console, cases: int, rows: list[tuple[str, float, str]]) -> None:
    from rich.table import Table

    bare = next(seconds for name, seconds, _ in rows if name.startswith("bare") and "1 thread " in name)
    table = Table(title=f"Evaluating {cases} ICD test cases as the specialist serves (one run; the same answers)")
    for column in ("system", "wall s", "cases/s", "speed-up vs bare 1 thread", "note"):
        table.add_column(column, justify="left" if column in ("system", "note") else "right")
    for name, seconds, note in rows:
        table.add_row(name, f"{seconds:.1f}", f"{cases / seconds:.2f}", f"{bare / seconds:.2f}×", note)
    console.print(table)
    by_name = {name: seconds for name, seconds, _ in rows}
    two = next(s for n, s in by_name.items() if "2 local Dask" in n)
    one = next(s for n, s in by_name.items() if "1 local Dask" in n)
    inline = next(s for n, s in by_name.items() if "this process, 2 threads" in n)
    console.print(
        f"2 workers against 1: [bold]{one / two:.2f}×[/]; 2 one-thread workers against this process at 2 threads: "
        f"[bold]{inline / two:.2f}×[/]"
    )


if __name__ == "__main__":
    raise SystemExit(main())
