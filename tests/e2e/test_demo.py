"""The README's main command on the smoke budget, then what Prefect's and MLflow's own clients report.

A copy of the shipped `pipelines.yaml` runs in a temporary project on free ports, so the test never
touches a stack a developer has running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from support import free_port

from cadre.stages import SCHEDULED, STAGES

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(ROOT / "evals", root / "evals", ignore=shutil.ignore_patterns("__pycache__"))
    yaml = YAML()
    document = yaml.load((ROOT / "pipelines.yaml").read_text())
    ports = {"mlflow": free_port(), "prefect": free_port(), "lm": free_port()}
    for service, port in ports.items():
        document["project"][service]["port"] = port
    with (root / "pipelines.yaml").open("w") as handle:
        yaml.dump(document, handle)
    config = root / "pipelines.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "cadre.cli", "demo", "-c", str(config), "--budget", "smoke"],
            check=False,
            capture_output=True,
            text=True,
            timeout=45 * 60,
            cwd=root,
            env=env,
        )
        yield run, ports
    finally:
        subprocess.run(
            [sys.executable, "-m", "cadre.cli", "down", "-c", str(config)],
            check=False,
            capture_output=True,
            timeout=120,
            cwd=root,
            env=env,
        )


def test_demo_completes_and_ends_with_a_summary(demo) -> None:
    run, ports = demo
    assert run.returncode == 0, run.stderr[-4000:]
    assert "What ran" in run.stderr
    assert "What the gates decided" in run.stderr  # each promotion/refusal this cycle, with its reason
    # The last step bundles the champions and judges the bundle beside the server (published or refused, with why).
    team = [entry["name"] for entry in YAML(typ="safe").load((ROOT / "pipelines.yaml").read_text())["specialists"]]
    assert len(team) >= 3, team
    for name in team:
        assert f"edge export · {name}" in run.stderr
        assert f"Edge bundle of {name}: PUBLISHED." in run.stderr or f"Edge bundle of {name}: REFUSED" in run.stderr
    # One table ends the cycle: per specialist its retrieval-only baseline, its champion, what each gate decided.
    summary = run.stderr.split("The team after this cycle", 1)[-1]
    assert "The team after this cycle" in run.stderr and all(name in summary for name in team), run.stderr[-4000:]
    assert f"http://127.0.0.1:{ports['prefect']}/deployments" in run.stderr
    assert f"http://127.0.0.1:{ports['mlflow']}/#/models" in run.stderr


def test_prefect_shows_the_schedules_and_completed_runs(demo) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    _, ports = demo
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        deployments = {d.name + ":" + client.read_flow(d.flow_id).name: d for d in client.read_deployments()}
        scheduled = [d for d in deployments.values() if d.schedules]
        assert len(deployments) >= len(STAGES)
        for deployment in scheduled:
            assert all(s.schedule.cron and s.active for s in deployment.schedules)
        runs = [r for r in client.read_flow_runs() if r.deployment_id]
        upcoming = [r for r in runs if r.state.is_scheduled()]  # the scheduler's next cron runs
        started = [r for r in runs if not r.state.is_scheduled()]
        assert upcoming, "active schedules should have queued upcoming runs"
        assert started and all(r.state.is_completed() for r in started), [(r.name, r.state.name) for r in started]
        ran = {client.read_flow(r.flow_id).name for r in started}
        assert {stage.flow for stage in STAGES if stage.name in SCHEDULED} <= ran, ran


def test_the_specialists_cycles_ran_side_by_side(demo) -> None:
    """Each specialist's flow runs span a stretch of time that overlaps every other specialist's, each flow run with
    its share of the cores among the chains running as it starts (one thread each on a 2-core machine while every
    chain still has flow runs ahead, never more than the file's)."""
    from prefect.client.orchestration import SyncPrefectClient

    _, ports = demo
    with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
        deployments = {d.id: d.name for d in client.read_deployments()}  # a deployment is named after its specialist
        started = [r for r in client.read_flow_runs() if r.deployment_id and r.start_time and r.end_time]
    shipped = YAML(typ="safe").load((ROOT / "pipelines.yaml").read_text())
    team = len(shipped["specialists"])

    def share(running: int) -> str:
        return str(min(shipped["project"]["threads"]["torch"], max(1, (os.cpu_count() or 1) // running)))

    spans: dict[str, tuple] = {}
    for run in started:
        name = deployments[run.deployment_id]
        first, last = spans.get(name, (run.start_time, run.end_time))
        spans[name] = (min(first, run.start_time), max(last, run.end_time))
    assert len(spans) == team, spans
    for run in started:
        threads = run.job_variables.get("env", {}).get("CADRE_TORCH_THREADS")
        if all(end > run.start_time for _, end in spans.values()):  # every chain has flow runs ahead: all running
            assert threads == share(team), (run.name, run.job_variables)
        else:  # a chain may have ended: the share of fewer chains
            assert threads in {share(running) for running in range(1, team + 1)}, (run.name, run.job_variables)
    for a, (a_start, a_end) in spans.items():
        for b, (b_start, b_end) in spans.items():
            assert a_start < b_end and b_start < a_end, f"{a} ran {a_start}–{a_end}, {b} ran {b_start}–{b_end}"


def test_mlflow_holds_a_run_per_flow_run(demo) -> None:
    from mlflow import MlflowClient

    _, ports = demo
    client = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
    for name in [e["name"] for e in YAML(typ="safe").load((ROOT / "pipelines.yaml").read_text())["specialists"]]:
        experiment = client.get_experiment_by_name(f"cadre-demo/{name}")
        assert experiment is not None and client.search_runs([experiment.experiment_id]), f"{name} logged no run"
    experiment = client.get_experiment_by_name("cadre-demo/icd10-coder")
    runs = client.search_runs([experiment.experiment_id])
    flows_logged = {r.data.tags.get("cadre.flow") for r in runs}
    assert flows_logged, "no MLflow run was logged"
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("cadre.flow"))
    # Every flow's run names its Prefect flow run; a nested run (the re-index a promoted embedder makes) links to
    # the same Prefect page, and its parent carries the id.
    by_id = {r.info.run_id: r for r in runs}
    for run in (r for r in runs if r.data.tags.get("cadre.flow")):
        parent = by_id.get(run.data.tags.get("mlflow.parentRunId", ""))
        owner = parent or run
        assert "cadre.prefect_flow_run_id" in owner.data.tags, (run.info.run_name, run.data.tags)
        assert run.data.tags.get("cadre.prefect_flow_run_url", "").endswith(
            owner.data.tags["cadre.prefect_flow_run_id"]
        )
    index_model = "cadre-demo.icd10-coder.index"
    champion = client.get_model_version_by_alias(index_model, "champion")
    assert champion.tags.get("cadre.gate") == "passed"
    for version in client.search_model_versions("name LIKE 'cadre-demo.icd10-coder.%'"):
        if not version.name.endswith(".lock"):
            assert version.tags.get("cadre.gate") in ("passed", "refused"), (
                version.name,
                version.version,
                version.tags,
            )
