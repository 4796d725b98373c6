"""The re-index flow under the smoke budget's wall-time cap: a capped build is never evaluated nor made live, the
run says why (MLflow tags `cadre.outcome` and `cadre.wall_cap`, which `cadre run` prints), and the next run resumes
that same build into the version that goes live.

Real MLflow server, real Prefect (test harness), the real MiniLM model and LanceDB; the source is a python entrypoint
written here that takes half a second per document, so a 1-second cap stops the build after a few of its six.

Run: `python -m pytest -m integration tests/integration/test_budget_wall_flow.py` (about a minute).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import project_name

from cadre.config import load_config
from cadre.config.budget import WALL_CAP_TAG
from cadre.knowledge.reindex import live_version
from cadre.registry.runs import experiment_name

pytestmark = pytest.mark.integration

TOPICS = {
    "os.path.split": "Split a pathname into a pair (head, tail) where tail is the last component.",
    "os.path.join": "Join one or more path components intelligently.",
    "json.dumps": "Serialize an object to a JSON formatted string.",
    "json.loads": "Deserialize a string containing a JSON document to a Python object.",
    "shutil.copy": "Copy the file src to the file or directory dst.",
    "time.sleep": "Delay execution for a given number of seconds.",
}
SOURCE = f"""\
import time

TOPICS = {TOPICS!r}


def load_documents(limit=None):
    for key, text in list(TOPICS.items())[:limit]:
        time.sleep(0.5)
        yield {{"id": key, "text": text}}
"""


@pytest.fixture
def config_path(tmp_path: Path, mlflow_server: str) -> Path:
    (tmp_path / "slow_help.py").write_text(SOURCE)
    suite = tmp_path / "suite"
    suite.mkdir()
    cases = [{"id": key, "question": text, "function": key, "relevant_ids": [key]} for key, text in TOPICS.items()]
    for split in ("train", "dev", "test"):
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(case) + "\n" for case in cases))
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {project_name("wallcap", tmp_path)}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
        specialists:
          - name: pyhelp
            description: test
            sources:
              - {{kind: python, name: help, entrypoint: "slow_help:load_documents"}}
            program:
              instruction: Name the function.
              inputs: [{{name: question}}]
              outputs: [{{name: function}}]
            evaluation: {{suite: suite, retrieval_metrics: [recall@5]}}
            smoke: {{max_wall_seconds: 1}}
        """)
    )
    return path


def test_a_wall_capped_reindex_is_never_live_says_so_and_the_next_run_resumes_it(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    from flows.reindex import reindex

    capped = reindex("pyhelp", str(config_path), budget="smoke", trigger_optimize=False)

    assert capped["wall_capped"] is True and capped["promoted"] is False and capped["version"], capped
    state = config_path.parent / ".cadre"
    assert live_version(state, "pyhelp") is None
    config = load_config(config_path)
    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(experiment_name(config, "pyhelp"))
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cadre.outcome"] == "wall_capped"
    assert "wall-time cap (1 s)" in run.data.tags[WALL_CAP_TAG], run.data.tags[WALL_CAP_TAG]
    assert f"version {capped['version']} stays an unfinished build" in run.data.tags[WALL_CAP_TAG]
    assert run.data.metrics["documents_total"] < len(TOPICS)
    assert "cadre.gate" not in run.data.tags, "a capped build must not reach the gate"

    resumed = reindex("pyhelp", str(config_path), budget="full", trigger_optimize=False)

    assert resumed["promoted"] is True and resumed["version"] == capped["version"], resumed
    assert live_version(state, "pyhelp") == capped["version"]
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert latest.data.metrics["documents_total"] == len(TOPICS) and WALL_CAP_TAG not in latest.data.tags
