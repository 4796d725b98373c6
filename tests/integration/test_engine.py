"""Embedding shards on a real Dask cluster through Prefect's Dask task runner (`project.engine.backend: dask`).

- A worker killed with SIGKILL while it embeds a shard: Dask runs the shard again on the worker that lives, the
  re-index completes, and its index holds the same chunk ids and the same vectors as an uninterrupted inline
  build (no chunk lost, none written twice).
- The default local cluster (no address) builds the same index as the inline engine, and each shard is a Prefect
  task run.
- An adapter evaluation's cases in shards on the cluster (`evaluate-shard` task runs), one worker killed while it
  answers a shard: every case is answered once, with the same answers and scores as in one process.

The cluster of the first test is started the way an existing cluster runs (`dask scheduler`, `dask worker`), and the
re-index reaches it by `engine.address`.

Run: `python -m pytest -m integration tests/integration/test_engine.py`
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from support import free_port, icd_index, icd_program

from cadre.config.knowledge import ChunkingSettings, SqlSource
from cadre.config.project import EmbeddingSettings, EngineSettings, ThreadSettings
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index import IndexLayout
from cadre.knowledge.index.lancedb_backend import LanceDBBackend
from cadre.knowledge.reindex import plan_and_apply

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CHUNKING = ChunkingSettings(max_tokens=96, overlap_tokens=8)
SOURCE = SqlSource(
    kind="sql",
    name="kb",
    url="sqlite:///data/kb.db",
    query="SELECT * FROM notes ORDER BY id",
    id_column="id",
    text_columns=["body"],
)
SHARD = 48  # chunks per shard: long enough (about a second at one thread) to kill a worker inside one
ROWS = 480


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(EmbeddingSettings(batch_size=16), ThreadSettings(embedding=1))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("engine")
    (tmp_path / "data").mkdir()
    words = "fever cough fracture rash anemia asthma migraine gout eczema otitis cystitis glaucoma".split()
    with sqlite3.connect(tmp_path / "data" / "kb.db") as connection:
        connection.execute("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)")
        connection.executemany(
            "INSERT INTO notes VALUES (?, ?)",
            [
                (
                    f"N{n:04d}",
                    " ".join(
                        f"Note {n}: patient {k} with {words[(n + k) % len(words)]} seen on day {k}." for k in range(8)
                    ),
                )
                for n in range(ROWS)
            ],
        )
    return tmp_path


@pytest.fixture(scope="module")
def reference(project: Path, embedder: Embedder):
    """The index an uninterrupted inline build makes, and its vectors."""
    result = build(project, embedder, ".inline", EngineSettings())
    return result, vectors(project, ".inline", result.version)


def build(project: Path, embedder: Embedder, state: str, engine: EngineSettings):
    return plan_and_apply(
        "coder",
        [SOURCE],
        CHUNKING,
        root=project,
        state_dir=project / state,
        embedder=embedder,
        engine=engine,
        write_batch_size=SHARD,
    )


def vectors(project: Path, state: str, version: str) -> dict[str, np.ndarray]:
    table = LanceDBBackend(IndexLayout(project / state, "coder").lancedb_dir).open_version(version)
    rows = table._scan(["id", "vector"]).to_pydict()
    assert len(rows["id"]) == len(set(rows["id"])), "a chunk was written twice"
    return {chunk_id: np.asarray(vector, dtype=np.float32) for chunk_id, vector in zip(rows["id"], rows["vector"])}


def assert_same_index(built: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert sorted(built) == sorted(reference)
    worst = max(float(np.abs(built[chunk_id] - reference[chunk_id]).max()) for chunk_id in reference)
    assert worst < 1e-5, f"vectors differ by up to {worst}"


def _dask(*arguments: str, log: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if PREFECT_API_URL.value():  # the test harness's server (set in this process's settings, not its environment)
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # as a user's workers report to the project's Prefect
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("dask")), *arguments],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


@pytest.fixture
def cluster(tmp_path: Path):
    """A scheduler and two single-thread workers without nannies (a killed worker stays dead), as separate
    processes: the cluster a user would point `engine.address` at."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = [
        _dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", log=tmp_path / "scheduler.log")
    ]
    try:
        for n in range(2):
            processes.append(
                _dask(
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--name",
                    f"w{n}",
                    log=tmp_path / f"worker{n}.log",
                )
            )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            pids = {f"w{n}": process.pid for n, process in enumerate(processes[1:])}  # (no nanny: the worker)
            workers = {
                info["name"]: (worker, pids[info["name"]])
                for worker, info in client.scheduler_info()["workers"].items()
            }
            yield address, client, workers
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def executing(client, worker: str) -> list[str]:
    """The keys of the tasks a worker's executor runs now (asked over the worker's own comm, not its busy thread)."""
    running = client.run(lambda dask_worker: [str(task.key) for task in dask_worker.state.executing], workers=[worker])
    return running.get(worker, [])


def kill_mid_shard(client, victim: str, victim_pid: int, runner: threading.Thread) -> list[str]:
    """SIGKILL the worker `victim` once its executor has held a shard for 0.3 s, while `runner` works; returns the
    keys it held then (empty: it was never seen holding one). Asked of the worker itself: the scheduler's per-state
    task counts drop a shard as soon as the flow has gathered it, so they can miss it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and runner.is_alive():
        if executing(client, victim):
            time.sleep(0.3)  # into the shard
            held = executing(client, victim)
            if held:
                os.kill(victim_pid, signal.SIGKILL)
                return held
        time.sleep(0.02)
    return []


def test_a_worker_killed_mid_shard_leaves_the_same_index_as_an_uninterrupted_run(
    project: Path, embedder: Embedder, reference, harness, cluster
):
    address, client, workers = cluster
    victim, victim_pid = workers["w0"]
    outcome: dict = {}

    def reindex() -> None:
        try:
            outcome["result"] = build(project, embedder, ".dask", EngineSettings(backend="dask", address=address))
        except BaseException as error:  # (reported by the test below)
            outcome["error"] = error

    runner = threading.Thread(target=reindex)
    runner.start()
    killed_holding = kill_mid_shard(client, victim, victim_pid, runner)
    runner.join(timeout=600)
    assert not runner.is_alive(), "the re-index did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    assert killed_holding, "w0 was never seen embedding a shard; the kill did not happen mid-shard"
    client.wait_for_workers(1, timeout=10)
    assert victim not in client.scheduler_info()["workers"], "w0 still runs"

    result, (clean, clean_vectors) = outcome["result"], reference
    assert result.chunks_total == clean.chunks_total > 10 * SHARD
    assert result.chunks_embedded == clean.chunks_embedded, "a shard was written twice or not at all"
    assert_same_index(vectors(project, ".dask", result.version), clean_vectors)


def test_the_local_cluster_builds_the_inline_index_and_each_shard_is_a_task_run(
    project: Path, embedder: Embedder, reference, harness
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    began = datetime.now(UTC)
    before = dict(os.environ)
    engine = EngineSettings(backend="dask", workers=2, threads_per_worker=1)
    result = build(project, embedder, ".local-cluster", engine)
    clean, clean_vectors = reference
    assert_same_index(vectors(project, ".local-cluster", result.version), clean_vectors)

    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == before.get("MALLOC_TRIM_THRESHOLD_"), (
        "the cluster's worker settings leaked into this process's environment"
    )
    assert os.environ.get("OMP_NUM_THREADS") == before.get("OMP_NUM_THREADS")

    shards = -(-clean.chunks_embedded // SHARD)
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(  # this test's shards: the first test's ran before it began
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="embed-shard"), start_time=TaskRunFilterStartTime(after_=began)
            )
        )
    completed = [run for run in runs if run.state_type and run.state_type.value == "COMPLETED"]
    assert len(completed) >= shards, f"{len(completed)} completed embed-shard task runs for {shards} shards"


def test_an_unreachable_scheduler_fails_with_the_setting_to_fix(embedder: Embedder) -> None:
    from cadre.knowledge.shards import open_engine

    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=r"cannot reach the Dask scheduler at .*project\.engine\.address"):
        with open_engine(EngineSettings(backend="dask", address=address), embedder):
            pass


def test_a_worker_killed_mid_shard_of_an_evaluation_leaves_the_answers_of_one_process(
    tmp_path: Path, harness, cluster
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from cadre.config import EvaluationSettings, load_config
    from cadre.config.project import IndexBackendSettings
    from cadre.demo.icd10 import load_documents
    from cadre.prompts.served import open_evaluator, shards_of
    from cadre.registry.champions import ServingSetup
    from cadre.runtime.base_model import BaseModelFiles, ensure_gguf
    from cadre.runtime.retrieval import IndexTarget

    address, client, workers = cluster
    victim, victim_pid = workers["w0"]
    version = icd_index(tmp_path, "coder", documents=60)
    cases = [
        {"id": document["id"], "phrase": document["title"], "code": document["id"], "relevant_ids": [document["id"]]}
        for document in list(load_documents(billable_only=True, limit=60))[::3]
    ]
    threads = ThreadSettings(torch=1, embedding=1)
    index = IndexTarget(
        "coder", str(tmp_path / "state"), str(tmp_path), IndexBackendSettings(), EmbeddingSettings(), threads,
        version=version,
    )  # fmt: skip
    gguf = str(ensure_gguf(load_config(REPO / "pipelines.yaml")))
    setup = ServingSetup(
        icd_program(3), None, index, BaseModelFiles("gemma3-270m", "", gguf, "gemma3-270m"), None, None, 1, 2048
    )
    evaluation = EvaluationSettings(suite="evals/suites/icd10-coder", answer_metrics=["exact_match"])

    with open_evaluator(None, str(tmp_path / "cache-inline")) as evaluator:
        clean = evaluator.evaluate(setup, evaluation, cases, None, None, "inline")

    began = datetime.now(UTC)
    outcome: dict = {}

    def evaluate() -> None:
        try:
            engine = EngineSettings(backend="dask", address=address)
            with open_evaluator(engine, str(tmp_path / "cache-dask")) as evaluator:
                outcome["run"] = evaluator.evaluate(setup, evaluation, cases, None, None, "dask")
        except BaseException as error:  # (reported below)
            outcome["error"] = error

    runner = threading.Thread(target=evaluate)
    runner.start()
    killed_holding = kill_mid_shard(client, victim, victim_pid, runner)  # (its first shard loads model and index)
    runner.join(timeout=600)
    assert not runner.is_alive(), "the evaluation did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    assert killed_holding, "w0 was never seen answering a shard; the kill did not happen mid-shard"

    sharded = outcome["run"].result
    assert sharded.cases == clean.result.cases == len(cases), "a case was scored twice or not at all"
    assert [(e.case_id, e.output, e.retrieved_ids) for e in sharded.examples] == [
        (e.case_id, e.output, e.retrieved_ids) for e in clean.result.examples
    ]
    quality = ["exact_match", *evaluation.retrieval_metrics]
    assert {m: sharded.scores[m] for m in quality} == {m: clean.result.scores[m] for m in quality}
    # (a redone shard may find answers its dead worker left in the disk cache: requests, not calls)
    assert outcome["run"].usage.requests == clean.usage.requests == len(cases)
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="evaluate-shard"), start_time=TaskRunFilterStartTime(after_=began)
            )
        )
    completed = [run for run in runs if run.state_type and run.state_type.value == "COMPLETED"]
    assert len(completed) >= len(shards_of(cases, 2)), [(run.name, run.state_name) for run in runs]
