"""What a reviewer sees in MLflow and Prefect, against a real MLflow server and Prefect's test harness.

- the Models tab holds only real models: the promotion lease is a tag on the model, never a `….lock` model,
  during a promotion or after it, and two holders still take turns;
- a flow's run opens as model development, names its git commit, lists its datasets, and carries its verdict
  (tag and run name); its Prefect flow run ends in a state named for the verdict with the summary artifact
  attached to the flow run itself;
- `cadre status` flags a champion alias moved outside Cadre (MLflow's own alias buttons).

Run: `python -m pytest -m integration tests/integration/test_review_registry.py` (about a minute).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

from cadre.config import load_config
from cadre.orchestration.run_page import SUMMARY_KEY
from cadre.registry import versions as registry
from cadre.registry.runs import close_run, log_dataset, open_run
from cadre.registry.view import SCORE_TABLE, print_champions, print_latest_tables

pytestmark = pytest.mark.integration

SPECIALIST, KIND = "coder", "adapter"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Decision:
    """A gate decision of the shape the registry asks for."""

    kind: str
    passed: bool

    def to_markdown(self) -> str:
        return f"### {self.kind} gate: {'PASSED' if self.passed else 'REFUSED'}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "passed": self.passed}


@pytest.fixture()
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture()
def project() -> str:
    return f"r{uuid.uuid4().hex[:8]}"


def candidate(client: MlflowClient, project: str) -> str:
    name = f"{project}/{SPECIALIST}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, '{"r": 8}', "adapter/adapter_config.json")
    client.set_terminated(run_id)
    version = registry.register_candidate(
        client,
        project=project,
        specialist=SPECIALIST,
        kind=KIND,
        run_id=run_id,
        artifact_path="adapter",
        lineage={"data_fingerprint": uuid.uuid4().hex},
    )
    return version.version


def decide(client: MlflowClient, project: str, version: str, passed: bool, **kwargs) -> registry.PromotionRecord:
    return registry.decide_and_promote(
        client,
        project=project,
        specialist=SPECIALIST,
        kind=KIND,
        version=version,
        decision=Decision(KIND, passed),
        actor="flow:review-test",
        **kwargs,
    )


def lock_models(client: MlflowClient, project: str) -> list[str]:
    return [m.name for m in client.search_registered_models(f"name LIKE '{project}%'") if m.name.endswith(".lock")]


def test_a_promotion_shows_no_lock_model_and_leaves_no_lease(client, project):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    v1 = candidate(client, project)
    seen: dict[str, object] = {}

    def look(step: str) -> None:
        if step == registry.STEP_BEFORE_ALIAS_MOVE:  # the lease is held right now
            seen["locks"] = lock_models(client, project)
            seen["lease"] = json.loads(client.get_registered_model(name).tags[registry.LEASE_TAG])

    decide(client, project, v1, True, on_step=look)
    assert seen["locks"] == []
    assert seen["lease"]["holder"] == "flow:review-test" and seen["lease"]["operation"] == f"decide v{v1}"
    assert client.get_registered_model(name).aliases == {"champion": v1, "challenger": v1}
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags
    assert lock_models(client, project) == []
    assert [m.name for m in client.search_registered_models(f"name LIKE '{project}%'")] == [name]
    history = client.get_experiment_by_name(registry.history_experiment_name(project, SPECIALIST))
    assert history.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs


def test_a_stale_lease_and_an_old_lock_model_are_cleared_by_the_next_promotion(client, project):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    v1 = candidate(client, project)
    dead = {
        "token": "dead",
        "holder": "crashed-worker",
        "operation": "decide v0",
        "expires_at": f"{time.time() - 5:.3f}",
    }
    client.set_registered_model_tag(name, registry.LEASE_TAG, json.dumps(dead))
    # What an older release left when it crashed mid-promotion.
    client.create_registered_model(
        registry.lock_model_name(name), tags={"cadre.lock": "true", "cadre.lock.expires_at": f"{time.time() - 5:.3f}"}
    )
    started = time.monotonic()
    decide(client, project, v1, True)
    assert time.monotonic() - started < 30  # the stale lease was broken, not waited out
    assert client.get_registered_model(name).aliases["champion"] == v1
    assert lock_models(client, project) == []
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags


def test_two_holders_of_the_lease_take_turns(client, project):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    candidate(client, project)  # the registered model exists
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    start = threading.Event()

    def hold(who: str) -> None:
        try:
            start.wait()
            with registry.model_lock(client, name, holder=who, operation="test", timeout_s=60) as lease:
                entered = time.monotonic()
                time.sleep(0.8)
                lease.check()
                spans.append((entered, time.monotonic()))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=hold, args=(f"worker-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    spans.sort()
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    assert lock_models(client, project) == []


def pipelines(tmp_path: Path, project: str, mlflow_server: str) -> Path:
    (tmp_path / "suite").mkdir(exist_ok=True)
    (tmp_path / "suite" / "test.jsonl").write_text('{"id": "1", "q": "typhoid", "a": "A01"}\n')
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""
        project: {{name: {project}, mlflow: {{tracking_uri: "{mlflow_server}"}}}}
        specialists:
          - name: {SPECIALIST}
            description: test specialist
            program: {{instruction: answer, inputs: [{{name: q}}], outputs: [{{name: a}}], retrieve_k: 0}}
            evaluation: {{suite: suite}}
            gates: {{adapter: [{{metric: exact_match, at_least: 0.6}}]}}
        """)
    )
    return path


def test_a_flow_run_opens_as_model_development_with_its_commit_datasets_and_verdict(
    client, project, mlflow_server, tmp_path
):
    config = load_config(pipelines(tmp_path, project, mlflow_server))
    handle = open_run(config, SPECIALIST, "refresh", "smoke", flow_run_id=None)
    experiment = client.get_experiment(handle.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = client.get_run(handle.run_id).data.tags.get("mlflow.source.git.commit")
    assert commit == (head or None)  # outside a git checkout (an installed package) there is no commit to name

    rows = [{"id": "1", "q": "typhoid", "a": "A01"}, {"id": "2", "q": "cholera", "a": "A00"}]
    log_dataset(handle, "test", "testing", "ab" * 32, str(tmp_path / "suite" / "test.jsonl"), rows)
    log_dataset(handle, "corpus", "corpus", "cd" * 32, "coder: 12 documents")
    inputs = {d.dataset.name: d for d in client.get_run(handle.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"test", "corpus"}
    assert inputs["test"].dataset.digest == "ab" * 8
    assert {t.key: t.value for t in inputs["test"].tags}["mlflow.data.context"] == "testing"
    assert json.loads(inputs["test"].dataset.profile)["num_rows"] == 2
    assert {t.key: t.value for t in inputs["corpus"].tags}["cadre.fingerprint"] == "cd" * 32

    for key, value in {"cadre.gate": "refused", "cadre.promoted": "false", "cadre.already_champion": "false"}.items():
        client.set_tag(handle.run_id, key, value)
    close_run(handle)
    run = client.get_run(handle.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["verdict"] == "refused" and run.info.run_name == "refresh-smoke: refused"
    found = client.search_runs([handle.experiment_id], filter_string="tags.verdict = 'refused'")
    assert [r.info.run_id for r in found] == [handle.run_id]


def test_status_flags_a_champion_alias_moved_outside_cadre(client, project, mlflow_server, tmp_path):
    config = load_config(pipelines(tmp_path, project, mlflow_server))
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    v1 = candidate(client, project)
    decide(client, project, v1, True)
    v2 = candidate(client, project)
    decide(client, project, v2, False)

    console = Console(record=True, width=220)
    print_champions(config, console)
    assert "moved outside Cadre" not in console.export_text()

    client.set_registered_model_alias(name, "champion", v2)  # MLflow UI's alias editor: no gate, no history
    console = Console(record=True, width=220)
    print_champions(config, console)
    text = console.export_text()
    assert "moved outside Cadre" in text and f"Cadre left v{v1}" in text and "cadre rollback" in text


def test_status_shows_the_latest_optimize_runs_test_table(client, project, mlflow_server, tmp_path):
    config = load_config(pipelines(tmp_path, project, mlflow_server))
    console = Console(record=True, width=220)
    print_latest_tables(config, console)
    assert console.export_text().strip() == ""  # no optimize run yet: nothing to show

    table = (
        "### Test split: 40 cases, 95% bootstrap intervals\n\n| system | exact_match |\n|---|---|\n"
        "| retrieval only (its top-1 document as the answer) | 0.575 [0.425, 0.725] |\n"
        "| candidate (answers score, 5 passages) | 0.600 [0.450, 0.750] |\n\nCompile: none."
    )
    for flow, text in (("optimize", table), ("optimize", None), ("refresh", "not this one")):
        handle = open_run(config, SPECIALIST, flow, "smoke", None)
        if text:
            client.log_text(handle.run_id, text, SCORE_TABLE)
        close_run(handle)  # the newest optimize run logged no table (stopped early): the one before is shown
    console = Console(record=True, width=220)
    print_latest_tables(config, console)
    text = console.export_text()
    assert "latest optimize run" in text and "Test split: 40 cases" in text, text
    assert "retrieval only" in text and "0.600 [0.450, 0.750]" in text and "Compile" not in text, text


def test_a_refused_flow_run_is_named_so_in_prefect_and_lists_its_summary(
    client, project, mlflow_server, tmp_path, harness
):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from cadre.orchestration.run_page import finished_state
    from tasks.tracking import tracked_run

    config = load_config(pipelines(tmp_path, project, mlflow_server))

    @flow(name="review-refused")
    def refused() -> dict:
        with tracked_run(config, SPECIALIST, "refresh", "smoke") as handle:
            MlflowClient(handle.tracking_uri).set_tag(handle.run_id, "cadre.gate", "refused")
            MlflowClient(handle.tracking_uri).set_tag(handle.run_id, "cadre.promoted", "false")
        return finished_state(handle, {"promoted": False})

    state = refused(return_state=True)
    assert state.name == "Refused" and state.is_completed()
    assert "gate refused" in state.message
    assert state.result() == {"promoted": False}

    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(state.state_details.flow_run_id)
        assert run.state.name == "Refused"
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    summary = [a for a in artifacts if a.key == SUMMARY_KEY]
    assert len(summary) == 1 and summary[0].task_run_id is None  # the flow run's own, not a task's
    assert "gate refused" in summary[0].data and mlflow_server in summary[0].data


def test_the_program_calls_of_an_optimize_run_are_traces_of_that_run(client, project, mlflow_server, tmp_path):
    import dspy
    import mlflow
    from dspy.utils import DummyLM

    from cadre.registry.runs import dspy_traces

    config = load_config(pipelines(tmp_path, project, mlflow_server))
    handle = open_run(config, SPECIALIST, "optimize", "smoke", flow_run_id=None)
    program = dspy.Predict("q -> a")
    with dspy_traces(handle, "optimize"), dspy.context(lm=DummyLM([{"a": "A01"}, {"a": "A00"}])):
        assert program(q="typhoid").a == "A01"
        assert program(q="cholera").a == "A00"
    assert mlflow.active_run() is None  # the flow's thread is left as it was
    with dspy.context(lm=DummyLM([{"a": "A20"}])):
        program(q="plague")  # after the block: not traced
    close_run(handle, "FAILED")
    assert client.get_run(handle.run_id).info.status == "FAILED"  # close_run decides how the run ended

    mlflow.set_tracking_uri(mlflow_server)
    traces = mlflow.search_traces(locations=[handle.experiment_id], run_id=handle.run_id, return_type="list")
    assert len(traces) == 2
    assert {t.info.state.value if hasattr(t.info.state, "value") else str(t.info.state) for t in traces} == {"OK"}
