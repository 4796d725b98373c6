"""How an evaluation's cases are cut into shards for the engine, and when a worker may reuse its open model.

The evaluation itself, in one process and on a real Dask cluster with a worker killed mid-shard, is
`tests/integration/test_engine.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
from support import icd_program

from cadre.prompts.served import SHARDS_PER_WORKER, ServedRun, shards_of
from cadre.registry.champions import ServingSetup
from cadre.runtime.base_model import BaseModelFiles


@pytest.mark.parametrize(("cases", "workers"), [(20, 2), (7, 4), (1, 3), (300, 2), (5, 1)])
def test_shards_keep_every_case_once_in_order(cases: int, workers: int) -> None:
    items = [{"id": f"c{n}"} for n in range(cases)]
    shards = shards_of(items, workers)
    assert [case for shard in shards for case in shard] == items
    assert all(shards) and len(shards) <= min(cases, workers * SHARDS_PER_WORKER)
    assert max(map(len, shards)) - min(map(len, shards)) <= max(map(len, shards)) // 2 + 1


def test_no_cases_make_no_shards() -> None:
    assert shards_of([], 2) == []


def test_a_worker_reuses_its_model_only_for_the_same_adapter_and_program() -> None:
    setup = ServingSetup(
        icd_program(3), None, None, BaseModelFiles("gemma3-270m", "", "/m/base.gguf", "gemma"), None, None, 1, 2048
    )
    run = ServedRun(setup, "/a/v1.gguf", "1", 1, "/cache")
    assert run.key() == ServedRun(setup, "/a/v1.gguf", "1", 1, "/cache").key()
    assert run.key() != dataclasses.replace(run, adapter_gguf="/a/v2.gguf").key()
    assert (
        run.key() != dataclasses.replace(run, setup=dataclasses.replace(setup, program_settings=icd_program(5))).key()
    )


def test_a_worker_that_cannot_see_the_adapter_says_what_it_needs(tmp_path) -> None:
    from cadre.prompts.served import evaluate_shard

    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF")
    setup = ServingSetup(icd_program(0), None, None, BaseModelFiles("b", "", str(base), "b"), None, None, 1, 2048)
    run = ServedRun(setup, str(tmp_path / "gone" / "adapter.gguf"), None, 1, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"cannot see .*gone/adapter\.gguf.*shared file system"):
        evaluate_shard.fn(run, [{"id": "c1", "phrase": "fever"}])


def test_a_shard_shipped_to_a_worker_reaches_the_worker_s_open_model() -> None:
    """Dask ships a Prefect task's function by value, with copies of the globals it names: a cache it named directly
    would arrive empty with every shard (each shard loading the model again). It reaches the cache through
    `opened`, a function shipped by reference."""
    import cloudpickle

    from cadre.prompts import served

    shipped = cloudpickle.loads(cloudpickle.dumps(served.evaluate_shard))
    assert "_opened" not in shipped.fn.__globals__
    assert shipped.fn.__globals__["opened"] is served.opened
