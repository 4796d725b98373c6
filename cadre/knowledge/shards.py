"""Where a re-index embeds its shards: in the flow run's own process, or on a Dask cluster through Prefect.

`project.engine.backend: dask` sends each shard of changed chunks to a Dask cluster as a Prefect task run
(`embed-shard`, through prefect-dask's `DaskTaskRunner`): a local cluster of `engine.workers` processes started for
the run, or the scheduler at `engine.address`. Each shows in the Prefect UI as a task run of the re-index's flow
run.

Shards are idempotent. A shard is a pure function of its texts and the model; only the re-index's own process
writes the vectors into the index, once per shard, as the shard's result arrives. When a worker dies mid-shard, Dask
runs the shard again on a worker that lives (a local cluster's nanny also starts a new worker), and the writer still
receives one result. When the re-index's own process dies, the next run resumes from the chunks already written
(`cadre.knowledge.reindex`).

Results are taken in the order shards were submitted, so the writes, the progress bar and the checkpoints follow the
corpus as the inline engine does; at most `in_flight` shards wait at once, which bounds the memory held.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from cadre.config.project import EngineSettings
from cadre.knowledge.embedding import Embedder
from cadre.platform.cluster import open_cluster

logger = logging.getLogger(__name__)


class ShardResult(Protocol):
    def result(self) -> np.ndarray: ...


class ShardEngine(Protocol):
    """Embeds shards of texts; `in_flight` is how many may be waiting at once."""

    in_flight: int

    def submit(self, texts: Sequence[str]) -> ShardResult: ...


@dataclasses.dataclass
class _Done:
    vectors: np.ndarray

    def result(self) -> np.ndarray:
        return self.vectors


class InlineEngine:
    """Embeds each shard at once, in this process (`engine.backend: inline`)."""

    in_flight = 1

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def submit(self, texts: Sequence[str]) -> ShardResult:
        return _Done(self.embedder.embed(texts))


@task(name="embed-shard", cache_policy=NO_CACHE, persist_result=False, log_prints=False)
def embed_shard(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """The vectors of one shard, computed on a Dask worker (the model loads once per worker process)."""
    return embedder.embed(texts)


class DaskEngine:
    """Sends each shard to a Dask cluster as an `embed-shard` Prefect task run (`engine.backend: dask`)."""

    def __init__(self, runner, embedder: Embedder, workers: int, threads_per_worker: int):
        self.runner = runner
        self.embedder = dataclasses.replace(embedder, threads=threads_per_worker)
        self.in_flight = max(2, 2 * workers)  # every worker busy, and the next shard queued behind it

    def submit(self, texts: Sequence[str]) -> ShardResult:
        return self.runner.submit(embed_shard, {"embedder": self.embedder, "texts": list(texts)})


@contextmanager
def open_engine(settings: EngineSettings, embedder: Embedder) -> Iterator[ShardEngine]:
    """The engine `settings` describe, started for the `with` block (a local Dask cluster stops at its end).

    Raises:
        RuntimeError: the Dask cluster at `settings.address` cannot be reached.
    """
    if settings.backend == "inline":
        yield InlineEngine(embedder)
        return
    with open_cluster(settings) as cluster:
        logger.info("embedding shards on %s (%d workers)", cluster.where, cluster.workers)
        yield DaskEngine(cluster.runner, embedder, cluster.workers, cluster.threads_per_worker)
