"""A specialist run as it serves, on many cases: in this process, or in shards on the project's engine.

The adapter refresh, its hyperparameter search and the feedback flow judge an adapter by running the specialist as
it serves (its program, retrieval from the live index, llama.cpp on the base GGUF with the adapter applied) on the
test or dev cases:

    with open_evaluator(config.project.engine, cache_dir) as evaluator:
        champion = evaluator.evaluate(setup, evaluation, cases, setup.adapter_gguf, setup.adapter_version, "champion")
        candidate = evaluator.evaluate(setup, evaluation, cases, candidate_gguf, None, "candidate-adapter")

With `project.engine.backend: inline` every case runs here, one after another. With `dask` the cases go to the
cluster in shards, each an `evaluate-shard` Prefect task run: a worker process opens the model, adapter and index once
and answers its shards' cases at `engine.threads_per_worker` threads; this process then scores all the predictions at
once, with the same bootstrap over the same cases as inline. Decoding is greedy, so a shard that Dask runs again after
its worker died gives the same predictions, and each case is scored once.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cadre.config import EvaluationSettings
from cadre.config.project import EngineSettings, ThreadSettings
from cadre.evaluation.results import Prediction, predict_case, score_predictions
from cadre.platform.cluster import Cluster, open_cluster
from cadre.prompts.optimize import EvaluationRun, evaluate_program, program_predictor, program_scoring
from cadre.prompts.program import (
    CompletionLM,
    LMUsage,
    SpecialistProgram,
    build_client,
    llama_cpp_target,
    load_program,
    open_retriever,
    program_context,
    use_disk_cache,
)
from cadre.registry.champions import ServingSetup

SHARDS_PER_WORKER = 3
"""Shards per worker: cases differ in length, so smaller shards keep every worker busy to the end."""


@dataclasses.dataclass(frozen=True)
class ServedRun:
    """What a worker needs to answer cases as the specialist serves with one adapter (all plain, picklable values).

    Attributes:
        setup: how the specialist serves (program, index, base model).
        adapter_gguf: the adapter to apply, or None for the bare base model.
        adapter_version: its registry version, for reports.
        n_threads: llama.cpp (and query-embedding) threads.
        cache_dir: DSPy's cache folder.
    """

    setup: ServingSetup
    adapter_gguf: str | None
    adapter_version: str | None
    n_threads: int
    cache_dir: str

    def key(self) -> str:
        setup = self.setup
        return json.dumps(
            [
                setup.program_settings.model_dump(mode="json"),
                setup.program_path,
                dataclasses.asdict(setup.index) if setup.index else None,
                setup.base.gguf,
                setup.n_ctx,
                self.adapter_gguf,
                self.n_threads,
                self.cache_dir,
            ],
            sort_keys=True,
            default=str,
        )


def open_served(run: ServedRun) -> tuple[SpecialistProgram, CompletionLM]:
    """The specialist's program (retrieving from its pinned index) and its LM: llama.cpp here, adapter applied."""
    use_disk_cache(run.cache_dir)
    setup = run.setup
    program_settings = setup.program_settings
    index = setup.index
    if index is not None and run.n_threads != setup.n_threads:
        index = dataclasses.replace(index, threads=ThreadSettings(torch=run.n_threads, embedding=run.n_threads))
    retriever = open_retriever(index) if index is not None and program_settings.retrieve_k else None
    if setup.program is not None:
        program = load_program(setup.program.path, program_settings, retriever)
    else:
        program = SpecialistProgram(program_settings, retriever)
    target = llama_cpp_target(setup.base.gguf, run.adapter_gguf, run.adapter_version, run.n_threads, setup.n_ctx)
    lm = CompletionLM(
        build_client(target),
        model_id=target.identity,
        max_tokens=program_settings.max_tokens,
        temperature=program_settings.temperature,
    )
    return program, lm


_opened: dict[str, tuple[SpecialistProgram, CompletionLM]] = {}
"""A worker process's open specialist (one at a time): its shards of one evaluation reuse the loaded model."""


def opened(run: ServedRun) -> tuple[SpecialistProgram, CompletionLM]:
    """`open_served(run)`, kept open in this process for the next shard of the same run.

    (A Prefect task's function travels to a Dask worker by value, with a copy of each global it names: it must
    reach this cache through a function, which travels by reference, or every shard would load the model again.)
    """
    key = run.key()
    if key not in _opened:
        _check_paths(run)
        _opened.clear()  # the previous adapter's model goes before the next one loads
        _opened[key] = open_served(run)
    return _opened[key]


@task(name="evaluate-shard", cache_policy=NO_CACHE, persist_result=False, log_prints=False)
def evaluate_shard(run: ServedRun, cases: list[dict[str, Any]]) -> tuple[list[Prediction], LMUsage]:
    """The predictions of one shard of cases, answered on a Dask worker, and the LM usage they took.

    Raises:
        FileNotFoundError: a file of the specialist is not at its path on this worker.
    """
    program, lm = opened(run)
    predict = program_predictor(program, run.setup.program_settings, lm)
    before = lm.usage.snapshot()
    with program_context(lm, run.setup.program_settings):
        predictions = [predict_case(predict, case) for case in cases]
    return predictions, lm.usage.since(before)


def _check_paths(run: ServedRun) -> None:
    setup = run.setup
    needed = [setup.base.gguf, run.adapter_gguf, setup.program_path, setup.index.state_dir if setup.index else None]
    missing = [path for path in needed if path and not Path(path).exists()]
    if missing:
        raise FileNotFoundError(
            f"engine worker {socket.gethostname()} cannot see {', '.join(missing)}: an evaluation on the engine reads "
            "the base model, the adapter, the program and the index from the project's paths, so every worker needs "
            "the state dir at the same path (a shared file system); or set project.engine.backend: inline"
        )


def shards_of(cases: Sequence[dict[str, Any]], workers: int) -> list[list[dict[str, Any]]]:
    """The cases in consecutive shards, `SHARDS_PER_WORKER` per worker (fewer when there are fewer cases)."""
    if not cases:
        return []
    count = min(len(cases), workers * SHARDS_PER_WORKER)
    size = -(-len(cases) // count)
    return [list(cases[start : start + size]) for start in range(0, len(cases), size)]


class ServedEvaluator:
    """Evaluates the specialist as it serves, on the engine it was opened with (`open_evaluator`)."""

    def __init__(self, cache_dir: str, cluster: Cluster | None):
        self.cache_dir = cache_dir
        self.cluster = cluster

    def evaluate(
        self,
        setup: ServingSetup,
        evaluation: EvaluationSettings,
        cases: Sequence[dict[str, Any]],
        adapter_gguf: str | None,
        adapter_version: str | None,
        name: str,
    ) -> EvaluationRun:
        """Score the specialist with `adapter_gguf` (or none) on `cases`, and print a one-line summary."""
        if self.cluster is None:
            program, lm = open_served(ServedRun(setup, adapter_gguf, adapter_version, setup.n_threads, self.cache_dir))
            scored = evaluate_program(program, setup.program_settings, evaluation, lm, cases, name)
        else:
            scored = self._on_cluster(self.cluster, setup, evaluation, cases, adapter_gguf, adapter_version, name)
        print(
            f"{name}: "
            + ", ".join(f"{m} {scored.result.scores[m]:.3f}" for m in evaluation.answer_metrics)
            + f" on {scored.result.cases} cases in {scored.wall_seconds:.0f} s"
            + (f" ({self.cluster.workers} engine workers)" if self.cluster else "")
        )
        return scored

    def _on_cluster(
        self,
        cluster: Cluster,
        setup: ServingSetup,
        evaluation: EvaluationSettings,
        cases: Sequence[dict[str, Any]],
        adapter_gguf: str | None,
        adapter_version: str | None,
        name: str,
    ) -> EvaluationRun:
        started = time.monotonic()
        run = ServedRun(setup, adapter_gguf, adapter_version, cluster.threads_per_worker, self.cache_dir)
        shards = shards_of(cases, cluster.workers)
        futures = [cluster.runner.submit(evaluate_shard, {"run": run, "cases": shard}) for shard in shards]
        predictions: list[Prediction] = []
        usage = LMUsage()
        for number, future in enumerate(futures, 1):
            answered, used = future.result()
            predictions.extend(answered)
            usage = usage.plus(used)
            print(f"{name}: shard {number}/{len(shards)} answered ({len(predictions)}/{len(cases)} cases)")
        result = score_predictions(cases, predictions, name=name, **program_scoring(setup.program_settings, evaluation))
        return EvaluationRun(result, usage, time.monotonic() - started)


@contextmanager
def open_evaluator(engine: EngineSettings | None, cache_dir: str) -> Iterator[ServedEvaluator]:
    """An evaluator on `engine` for the `with` block: in this process (`inline`, or None), or on the Dask cluster
    `engine` describes (a local one is started here and stops at the block's end).

    Raises:
        RuntimeError: the Dask cluster at `engine.address` cannot be reached.
    """
    with ExitStack() as stack:
        cluster = None
        if engine is not None and engine.backend == "dask":
            cluster = stack.enter_context(open_cluster(engine))
        yield ServedEvaluator(cache_dir, cluster)


__all__ = ["ServedEvaluator", "ServedRun", "evaluate_shard", "open_evaluator", "open_served", "shards_of"]
