"""The Dask cluster of `project.engine.backend: dask`, opened through Prefect's Dask task runner.

The heavy, parallel work runs there: a re-index's embedding shards (`cadre.knowledge.shards`) and an adapter
evaluation's cases (`cadre.prompts.served`). Each piece is a Prefect task run submitted through prefect-dask's
`DaskTaskRunner`, so it shows in the Prefect UI under the flow run that submitted it.

`open_cluster(settings)` starts a local cluster of `engine.workers` processes for the `with` block, or connects to
the scheduler at `engine.address`, and fails within `CONNECT_TIMEOUT_S` with what to do when that scheduler is not
there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from cadre.config.project import EngineSettings

CONNECT_TIMEOUT_S = 10
"""How long a run waits for the scheduler at `engine.address` before it fails with a clear error."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """An open Dask cluster.

    Attributes:
        runner: prefect-dask's `DaskTaskRunner`, entered (`runner.submit(task, parameters)`).
        workers: how many workers it has now.
        threads_per_worker: the threads each piece of work may use (`engine.threads_per_worker`).
        where: for messages: the address, or the local cluster's scheduler.
    """

    runner: Any
    workers: int
    threads_per_worker: int
    where: str


@contextmanager
def _environment_restored() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@contextmanager
def open_cluster(settings: EngineSettings) -> Iterator[Cluster]:
    """The Dask cluster `settings` describe (`backend: dask`), for the `with` block; a local one stops at its end.

    Raises:
        RuntimeError: the scheduler at `settings.address` cannot be reached.
    """
    from prefect_dask import DaskTaskRunner

    if settings.address:
        runner = DaskTaskRunner(address=settings.address, client_kwargs={"timeout": CONNECT_TIMEOUT_S})
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": settings.workers,
                "threads_per_worker": settings.threads_per_worker,
                "processes": True,
            }
        )
    with ExitStack() as stack:
        # A local cluster's nannies write the workers' settings (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...)
        # into this process's environment; they must not outlive the cluster in the flow run's process.
        stack.enter_context(_environment_restored())
        stack.enter_context(runner)
        try:
            client = runner.client  # starts the local cluster, or connects to the one at the address
        except OSError as error:
            raise RuntimeError(
                f"cannot reach the Dask scheduler at {settings.address} (project.engine.address) within "
                f"{CONNECT_TIMEOUT_S} s: {error}. Start it (`dask scheduler`), or set project.engine.backend: inline"
            ) from None
        workers = len(client.scheduler_info().get("workers", {})) or settings.workers
        where = settings.address or f"a local Dask cluster ({client.scheduler.address})"
        yield Cluster(runner, workers, settings.threads_per_worker, where)


__all__ = ["CONNECT_TIMEOUT_S", "Cluster", "open_cluster"]
