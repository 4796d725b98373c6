"""The re-index flow end to end on a tiny SQLite source: the budget's plan caps the documents, the retrieval gate
judges, the registry and the live pointer follow, and an unknown budget is refused before anything runs.

Real MLflow server, real Prefect (test harness), the real MiniLM model and LanceDB; no mocks.

Run: `python -m pytest -m integration tests/integration/test_reindex_flow.py` (about two minutes).
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import project_name

from cadre.config import load_config
from cadre.knowledge.reindex import live_version
from cadre.registry.runs import experiment_name

pytestmark = pytest.mark.integration
ROWS = 12
SMOKE_DOCUMENTS = 8


@pytest.fixture
def config_path(tmp_path: Path, mlflow_server: str) -> Path:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "kb.db") as connection:
        connection.execute("CREATE TABLE codes (code TEXT PRIMARY KEY, description TEXT)")
        connection.executemany(
            "INSERT INTO codes VALUES (?, ?)",
            [(f"C{n:03d}", f"Patients with condition number {n} present with finding {n}.") for n in range(ROWS)],
        )
    suite = tmp_path / "suite"
    suite.mkdir()
    for split in ("train", "dev", "test"):
        rows = [
            {
                "id": f"{split}-{n}",
                "phrase": f"condition number {n}",
                "code": f"C{n:03d}",
                "relevant_ids": [f"C{n:03d}"],
            }
            for n in range(ROWS)
        ]
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {project_name("reflow", tmp_path)}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
        specialists:
          - name: coder
            description: test
            sources:
              - {{kind: sql, name: kb, url: "sqlite:///data/kb.db", query: "SELECT * FROM codes ORDER BY code",
                  id_column: code, text_columns: [description]}}
            program:
              instruction: Code it.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
            evaluation: {{suite: suite, retrieval_metrics: [recall@5]}}
            smoke: {{max_documents: {SMOKE_DOCUMENTS}}}
        """)
    )
    return path


def test_a_smoke_reindex_indexes_the_capped_documents_and_promotes_through_the_gate(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    from flows.reindex import reindex

    result = reindex("coder", str(config_path), budget="smoke", trigger_optimize=False)

    assert result["changed"] is True and result["promoted"] is True, result
    state = config_path.parent / ".cadre"
    assert live_version(state, "coder") == result["version"]
    config = load_config(config_path)
    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(experiment_name(config, "coder"))
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["cadre.budget"] == "smoke"
    assert run.data.metrics["documents_total"] == SMOKE_DOCUMENTS


def test_an_unknown_budget_is_refused_before_the_flow_runs(config_path: Path, harness: None) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.reindex import reindex

    with pytest.raises(ParameterTypeError, match="budget"):
        reindex("coder", str(config_path), budget="huge", trigger_optimize=False)
    assert not (config_path.parent / ".cadre" / "index").exists()


def test_on_the_dask_engine_each_shard_is_a_task_run_of_the_flow_run(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    """`project.engine.backend: dask` in a real flow run: the shards run on a local Dask cluster as task runs of the
    re-index's flow run, and the index is built and promoted as inline."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    from flows.reindex import reindex

    text = config_path.read_text()
    config_path.write_text(
        text.replace("  mlflow:", "  engine: {backend: dask, workers: 1, shard_chunks: 4}\n  mlflow:", 1)
    )
    state = reindex("coder", str(config_path), budget="full", trigger_optimize=False, return_state=True)
    result = state.result()
    assert result["changed"] is True and result["promoted"] is True, result
    with get_client(sync_client=True) as client:
        shards = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="embed-shard")),
        )
    config = load_config(config_path)
    tracking = MlflowClient(config.project.mlflow.uri)
    experiment = tracking.get_experiment_by_name(experiment_name(config, "coder"))
    run = tracking.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    chunks = int(run.data.metrics["chunks_embedded"])
    assert chunks > 4 and len(shards) == -(-chunks // 4) and all(shard.state_name == "Completed" for shard in shards), [
        (shard.name, shard.state_name) for shard in shards
    ]
