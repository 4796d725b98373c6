"""The registry against a real MLflow server: gated promotion, refusal, rollback, history, crash safety, locking.

Run: `python -m pytest -m integration tests/integration/test_registry.py`. Each test works in a
project of its own on the session's server, so the tests do not see each other's models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient
from rich.console import Console

from cadre.config import load_config
from cadre.registry import versions as registry
from cadre.registry.versions import (
    CHALLENGER,
    CHAMPION,
    STEP_ALIAS_MOVED,
    STEP_BEFORE_ALIAS_MOVE,
    STEP_VERSION_CREATED,
    IncompleteVersionError,
    NothingToRollBackError,
    NotRetirableError,
    PromotionRefusedError,
    decide_and_promote,
    history,
    promote,
    register_candidate,
    retire,
    rollback,
)
from cadre.registry.view import describe_record, print_champions, print_history

pytestmark = pytest.mark.integration

SPECIALIST = "coder"
KIND = "adapter"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RuleCheck:
    """One gate rule applied to a candidate."""

    rule: str
    metric: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class Decision:
    """A minimal gate decision with the shape `cadre.registry.versions.GateDecision` asks for."""

    kind: str
    checks: list[RuleCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def metrics(self) -> dict[str, float]:
        return {check.metric: check.value for check in self.checks}

    def to_markdown(self) -> str:
        lines = [
            f"### {self.kind} gate: {'PASSED' if self.passed else 'REFUSED'}",
            "",
            "| rule | value | result |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {c.rule} | {c.value:.4f} | {'pass' if c.passed else 'FAIL'} |" for c in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "passed": self.passed, "checks": [c.__dict__ for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict) -> Decision:
        return cls(kind=data["kind"], checks=[RuleCheck(**c) for c in data["checks"]])


def gate(exact_match: float, latency_ms: float = 120.0) -> Decision:
    """The adapter gate of these tests: exact_match ≥ 0.6 and latency_p95_ms ≤ 500."""
    return Decision(
        KIND,
        [
            RuleCheck("exact_match ≥ 0.6", "exact_match", exact_match, 0.6, exact_match >= 0.6),
            RuleCheck("latency_p95_ms ≤ 500", "latency_p95_ms", latency_ms, 500.0, latency_ms <= 500.0),
        ],
    )


@pytest.fixture()
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture()
def project() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def train_run(client: MlflowClient, project: str) -> str:
    """A finished run holding a (tiny) adapter folder, as the refresh flow would leave it."""
    name = f"{project}/{SPECIALIST}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, '{"r": 8}', "adapter/adapter_config.json")
    client.set_terminated(run_id)
    return run_id


def candidate(client: MlflowClient, project: str, **kwargs) -> str:
    run_id = kwargs.pop("run_id", None) or train_run(client, project)
    version = register_candidate(
        client,
        project=project,
        specialist=SPECIALIST,
        kind=KIND,
        run_id=run_id,
        artifact_path="adapter",
        lineage={"config_sha256": "abc123", "base_model": "gemma3-270m", "data_fingerprint": "d41d8"},
        description="adapter refreshed on the test split",
        **kwargs,
    )
    return version.version


def decide(client: MlflowClient, project: str, version: str, exact_match: float, **kwargs) -> registry.PromotionRecord:
    return decide_and_promote(
        client,
        project=project,
        specialist=SPECIALIST,
        kind=KIND,
        version=version,
        decision=gate(exact_match),
        actor="flow:refresh",
        **kwargs,
    )


def aliases(client: MlflowClient, project: str) -> dict[str, str]:
    return dict(client.get_registered_model(registry.registered_model_name(project, SPECIALIST, KIND)).aliases)


def assert_aliases_on_complete_versions(client: MlflowClient, project: str) -> None:
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    for alias, version in aliases(client, project).items():
        found = client.get_model_version(name, version)
        assert found.status == "READY" and found.tags.get("cadre.registration") == "complete", (
            alias,
            version,
            found.tags,
        )


def test_refused_candidate_is_not_promoted_and_passing_one_is(client, project):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    v1 = candidate(client, project)
    assert aliases(client, project) == {CHALLENGER: v1}
    tags = client.get_model_version(name, v1).tags
    assert tags["cadre.lineage.config_sha256"] == "abc123" and tags["cadre.lineage.base_model"] == "gemma3-270m"
    assert (
        tags["cadre.lineage.run_id"] == client.get_model_version(name, v1).run_id and tags["cadre.lineage.code_version"]
    )

    first = decide(client, project, v1, 0.70)
    assert (first.event, first.from_version, first.to_version) == ("promotion", None, v1)
    assert aliases(client, project)[CHAMPION] == v1

    v2 = candidate(client, project)
    refused = decide(client, project, v2, 0.41)
    assert (refused.event, refused.gate, refused.to_version) == ("refusal", "refused", v1)
    assert aliases(client, project) == {CHAMPION: v1, CHALLENGER: v2}
    assert client.get_model_version(name, v2).tags["cadre.gate"] == "refused"

    v3 = candidate(client, project)
    promoted = decide(client, project, v3, 0.80)
    assert (promoted.from_version, promoted.to_version) == (v1, v3)
    assert aliases(client, project)[CHAMPION] == v3
    assert client.get_registered_model(name).tags["cadre.champion.previous"] == v1

    info = registry.champions(client, project, SPECIALIST)[KIND]
    assert (info.version, info.gate, info.promoted_by) == (v3, "passed", "flow:refresh")
    assert info.metrics == {"exact_match": 0.80, "latency_p95_ms": 120.0} and info.promoted_at == promoted.at


def test_gate_report_is_readable_through_mlflow(client, project, tmp_path):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    version = candidate(client, project)
    decision = gate(0.734, latency_ms=212.5)
    decide_and_promote(
        client, project=project, specialist=SPECIALIST, kind=KIND, version=version, decision=decision, actor="ci"
    )

    found = client.get_model_version(name, version)
    for check in decision.checks:
        assert check.rule in found.description and f"{check.value:.4f}" in found.description
    assert "PASSED" in found.description and "adapter refreshed on the test split" in found.description

    local = client.download_artifacts(found.run_id, found.tags["cadre.gate.report"], str(tmp_path))
    assert Path(local).name == "gate_report.json"
    assert Decision.from_dict(json.loads(Path(local).read_text())) == decision
    assert registry.read_gate_report(client, name, version) == decision.to_dict()


def test_decision_from_cadre_gates_round_trips(client, project):
    from cadre.evaluation import gates

    outcome = gates.RuleOutcome(
        rule_text="exact_match ≥ 0.6",
        kind="at_least",
        metric="exact_match",
        threshold=0.6,
        passed=True,
        skipped=False,
        candidate=0.8125,
        champion=None,
        delta=None,
        interval=(0.75, 0.875),
        detail="exact_match 0.8125 ≥ 0.6",
    )
    decision = gates.GateDecision(
        kind=KIND,
        passed=True,
        outcomes=[outcome],
        decided_at="2026-01-01T00:00:00+00:00",
        summary="PASSED: 1 of 1 checked rule(s) passed.",
        candidate_name="adapter v1",
    )
    assert isinstance(decision, registry.GateDecision)
    version = candidate(client, project)
    record = decide_and_promote(
        client, project=project, specialist=SPECIALIST, kind=KIND, version=version, decision=decision, actor="ci"
    )
    assert record.metrics == {"exact_match": 0.8125} and aliases(client, project)[CHAMPION] == version
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    assert gates.GateDecision.from_dict(registry.read_gate_report(client, name, version)) == decision
    description = client.get_model_version(name, version).description
    assert "exact_match ≥ 0.6" in description and "0.812" in description


def test_rollback_restores_previous_champion_and_history_lists_every_event(client, project):
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    v2 = candidate(client, project)
    decide(client, project, v2, 0.30)
    v3 = candidate(client, project)
    decide(client, project, v3, 0.90)

    back = rollback(client, project, SPECIALIST, KIND, actor="alice", reason="v3 answers in the wrong format")
    assert (back.event, back.from_version, back.to_version) == ("rollback", v3, v1)
    assert aliases(client, project)[CHAMPION] == v1

    events = history(client, project, SPECIALIST, KIND)
    assert [(e.seq, e.event, e.version, e.from_version, e.to_version) for e in events] == [
        (1, "promotion", v1, None, v1),
        (2, "refusal", v2, v1, v1),
        (3, "promotion", v3, v1, v3),
        (4, "rollback", v1, v3, v1),
    ]
    assert [e.metrics["exact_match"] for e in events] == [0.70, 0.30, 0.90, 0.70]
    assert events[3].actor == "alice" and events[3].reason == "v3 answers in the wrong format"
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert history(client, project, SPECIALIST) == events  # all kinds of the specialist: only adapters here

    with pytest.raises(NothingToRollBackError, match="no earlier one"):
        rollback(client, project, SPECIALIST, KIND, actor="alice")
    assert aliases(client, project)[CHAMPION] == v1


def test_retire_removes_a_first_champion_and_promote_reinstates_it(client, project):
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    with pytest.raises(NothingToRollBackError, match=f"cadre retire {SPECIALIST} {KIND}"):
        rollback(client, project, SPECIALIST, KIND, actor="alice")

    retired = retire(client, project, SPECIALIST, KIND, actor="alice", reason="v1 hurts the cardiology slice")
    assert (retired.event, retired.version, retired.from_version, retired.to_version) == ("retirement", v1, v1, None)
    assert CHAMPION not in aliases(client, project)
    assert registry.get_champion(client, project, SPECIALIST, KIND) is None
    assert "champion v1 → none" in describe_record(retired)
    with pytest.raises(NothingToRollBackError, match="base model without an adapter already serves"):
        retire(client, project, SPECIALIST, KIND, actor="alice")
    with pytest.raises(NothingToRollBackError, match="has no champion"):
        rollback(client, project, SPECIALIST, KIND, actor="alice")

    back = promote(
        client, project=project, specialist=SPECIALIST, kind=KIND, version=v1, actor="alice"
    )  # its gate passed
    assert aliases(client, project)[CHAMPION] == v1 and back.from_version is None
    events = history(client, project, SPECIALIST, KIND)
    assert [(e.event, e.from_version, e.to_version) for e in events] == [
        ("promotion", None, v1),
        ("retirement", v1, None),
        ("promotion", None, v1),
    ]
    assert events[1].reason == "v1 hurts the cardiology slice"
    with pytest.raises(NotRetirableError, match="cadre rollback"):
        retire(client, project, SPECIALIST, "index", actor="alice")


def test_rollback_without_champion_is_a_clear_error(client, project):
    candidate(client, project)
    with pytest.raises(NothingToRollBackError, match="has no champion"):
        rollback(client, project, SPECIALIST, KIND, actor="alice")


def test_manual_promote_needs_a_passed_gate_or_force_with_reason(client, project):
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    v2 = candidate(client, project)
    decide(client, project, v2, 0.50)

    with pytest.raises(PromotionRefusedError, match="refused by its gate"):
        promote(client, project=project, specialist=SPECIALIST, kind=KIND, version=v2, actor="bob")
    with pytest.raises(PromotionRefusedError, match="needs a reason"):
        promote(
            client, project=project, specialist=SPECIALIST, kind=KIND, version=v2, actor="bob", force=True, reason="  "
        )
    assert aliases(client, project)[CHAMPION] == v1

    record = promote(
        client,
        project=project,
        specialist=SPECIALIST,
        kind=KIND,
        version=v2,
        actor="bob",
        force=True,
        reason="v1 leaks PHI; v2 is safe even if less accurate",
    )
    assert aliases(client, project)[CHAMPION] == v2
    last = history(client, project, SPECIALIST, KIND)[-1]
    assert last == record
    assert (last.event, last.forced, last.gate, last.actor, last.from_version) == (
        "promotion",
        True,
        "refused",
        "bob",
        v1,
    )
    assert last.reason == "v1 leaks PHI; v2 is safe even if less accurate"
    assert describe_record(last).startswith(
        f"promotion (forced) of {last.model_name} v{v2}: champion v{v1} → v{v2}, by bob"
    )


def test_failure_while_registering_leaves_no_alias_on_the_half_registered_version(client, project):
    name = registry.registered_model_name(project, SPECIALIST, KIND)
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)

    def crash(step: str) -> None:
        if step == STEP_VERSION_CREATED:
            raise RuntimeError("injected: worker lost after creating the version")

    run_id = train_run(client, project)
    with pytest.raises(RuntimeError, match="injected"):
        candidate(client, project, run_id=run_id, on_step=crash)
    half = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert half.tags.get("cadre.registration") == "pending" and not half.aliases
    assert aliases(client, project) == {CHAMPION: v1, CHALLENGER: v1}
    with pytest.raises(IncompleteVersionError):
        decide(client, project, half.version, 0.99)
    assert aliases(client, project)[CHAMPION] == v1

    # Re-running the registration completes the same version instead of making another.
    assert candidate(client, project, run_id=run_id) == half.version
    decide(client, project, half.version, 0.99)
    assert aliases(client, project) == {CHAMPION: half.version, CHALLENGER: half.version}
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_crash_between_evaluate_and_alias_move_keeps_registry_consistent_and_rerun_converges(
    client, project, mlflow_server
):
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    v2 = candidate(client, project)

    # A real crash: the worker process dies (no exception handler runs) right before the alias move,
    # holding the lease. Its lease is shortened so the next promotion may break it.
    code = f"""
        import os
        from mlflow import MlflowClient
        from cadre.registry import versions as registry
        gate = load_test_module().gate
        registry.LEASE_TTL_S = 2.0
        def die(step):
            if step == {STEP_BEFORE_ALIAS_MOVE!r}:
                os._exit(17)
        registry.decide_and_promote(MlflowClient({mlflow_server!r}, {mlflow_server!r}), project={project!r}, specialist={SPECIALIST!r},
                                    kind={KIND!r}, version={v2!r}, decision=gate(0.95), actor="flow:crashing", on_step=die)
    """
    assert run_python(code).returncode == 17

    name = registry.registered_model_name(project, SPECIALIST, KIND)
    assert aliases(client, project)[CHAMPION] == v1
    assert client.get_model_version(name, v2).tags["cadre.gate"] == "passed"  # the report is there, the move is not
    assert_aliases_on_complete_versions(client, project)
    assert [e.event for e in history(client, project, SPECIALIST, KIND)] == [
        "promotion"
    ]  # the crashed attempt did not apply

    rerun = decide(client, project, v2, 0.95)
    assert aliases(client, project)[CHAMPION] == v2
    assert (rerun.from_version, rerun.to_version) == (v1, v2)
    assert decide(client, project, v2, 0.95) == rerun  # once in effect, a re-run records nothing new
    everything = history(client, project, SPECIALIST, KIND, include_unapplied=True)
    assert [(e.event, e.to_version, e.outcome) for e in everything] == [
        ("promotion", v1, "applied"),
        ("promotion", v2, "aborted"),
        ("promotion", v2, "applied"),
    ]
    assert [e.to_version for e in history(client, project, SPECIALIST, KIND)] == [v1, v2]

    # A failure just after the alias moved (the process survives): the event is settled as applied.
    v3 = candidate(client, project)

    def fail_after_move(step: str) -> None:
        if step == STEP_ALIAS_MOVED:
            raise RuntimeError("injected: lost connection after the alias move")

    with pytest.raises(RuntimeError, match="injected"):
        decide(client, project, v3, 0.97, on_step=fail_after_move)
    assert aliases(client, project)[CHAMPION] == v3
    assert [e.to_version for e in history(client, project, SPECIALIST, KIND)] == [v1, v2, v3]


def test_concurrent_promotions_are_serialized(client, project, mlflow_server, tmp_path):
    assert_concurrent_promotions_are_serialized(client, project, mlflow_server, tmp_path)


def assert_concurrent_promotions_are_serialized(client: MlflowClient, project: str, mlflow_server: str, tmp_path: Path):
    """Two processes promote two versions of one model at the same instant: the registry lock serializes them (the
    Postgres tier runs this against MLflow on PostgreSQL with several server workers)."""
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    v2, v3 = candidate(client, project), candidate(client, project)

    # Two worker processes; each says when it has imported everything, and both start on one signal.
    code = """
        import sys, time
        from pathlib import Path
        from mlflow import MlflowClient
        from cadre.registry import versions as registry
        gate = load_test_module().gate
        uri, project, version, folder = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
        def slow(step):
            if step == registry.STEP_BEFORE_ALIAS_MOVE:
                time.sleep(1.0)  # widen the critical section so the other worker surely collides with it
        (folder / f"ready-{version}").touch()
        while not (folder / "go").exists():
            time.sleep(0.01)
        started = time.monotonic()
        registry.decide_and_promote(MlflowClient(uri, uri), project=project, specialist="coder", kind="adapter",
                                    version=version, decision=gate(0.9), actor=f"worker-{version}", on_step=slow)
        print(f"elapsed={time.monotonic() - started:.3f}")
    """
    workers = [start_python(code, mlflow_server, project, version, str(tmp_path)) for version in (v2, v3)]
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"ready-{v}").exists() for v in (v2, v3)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "a worker did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    elapsed = []
    for worker in workers:
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, out
        elapsed.append(float(out.rsplit("elapsed=", 1)[1]))

    promotions = history(client, project, SPECIALIST, KIND)[1:]
    assert sorted(e.to_version for e in promotions) == sorted([v2, v3])
    first, second = promotions
    assert (first.seq, second.seq) == (2, 3)
    assert first.from_version == v1 and second.from_version == first.to_version  # the second saw the first's result
    assert max(elapsed) >= 1.9  # the second waited for the first's one-second critical section
    assert aliases(client, project)[CHAMPION] == second.to_version
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_registered_model(registry.lock_model_name(registry.registered_model_name(project, SPECIALIST, KIND)))


def test_registry_view_prints_champions_and_history(client, project, mlflow_server, tmp_path):
    v1 = candidate(client, project)
    decide(client, project, v1, 0.70)
    v2 = candidate(client, project)
    decide(client, project, v2, 0.20)
    (tmp_path / "suite").mkdir()
    (tmp_path / "pipelines.yaml").write_text(
        textwrap.dedent(f"""
        project: {{name: {project}, mlflow: {{tracking_uri: "{mlflow_server}"}}}}
        specialists:
          - name: {SPECIALIST}
            description: test specialist
            program: {{instruction: answer, inputs: [{{name: q}}], outputs: [{{name: a}}], retrieve_k: 0}}
            evaluation: {{suite: suite}}
            gates: {{adapter: [{{metric: exact_match, at_least: 0.6}}]}}
          - name: idle
            description: a specialist with nothing registered
            program: {{instruction: answer, inputs: [{{name: q}}], outputs: [{{name: a}}], retrieve_k: 0}}
            evaluation: {{suite: suite}}
    """)
    )
    config = load_config(tmp_path / "pipelines.yaml")
    console = Console(record=True, width=200)
    print_champions(config, console)
    print_history(config, SPECIALIST, None, console)
    text = console.export_text()
    assert f"v{v1}" in text and "exact_match = 0.7" in text
    assert (
        "none: the declared program serves" in text
        and "none: the base model serves" in text
        and "no candidate yet" in text
    )
    assert "index" not in text.split("History of")[0], "a specialist without sources has no index row"
    assert "promotion" in text and "refusal" in text and "exact_match = 0.2" in text


# A worker process: loads this file by path for `gate` (a `tests` package elsewhere on sys.path must not shadow it).
_CHILD_PRELUDE = f"""
import importlib.util, sys
def load_test_module():
    spec = importlib.util.spec_from_file_location("cadre_registry_test", {str(Path(__file__))!r})
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
"""


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHILD_PRELUDE + textwrap.dedent(code), *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_PRELUDE + textwrap.dedent(code), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
