"""The README's "Adding a specialist", followed literally on a tiny specialist with data of its own.

The specialist's entry is the README's YAML snippet and the commands are the README's bash blocks, read from
README.md; only the data files it names and the project's ports are written here. Every command is given
`-c FILE` and run from another folder. Checked: the deploy is paused, the promoted re-index's queued optimize is
the one optimize that runs (`cadre run optimize` follows it and prints its figures), `cadre cancel` cancels, and
the custom state directory ignores itself.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from support import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CADRE = [sys.executable, "-m", "cadre.cli"]

CLAUSES = {
    "c1": ("termination", "Either party may end this agreement with thirty days written notice."),
    "c2": ("confidentiality", "The receiving party keeps the disclosed information secret."),
    "c3": ("payment", "Invoices are due within thirty days of receipt."),
    "c4": ("liability", "Neither party is liable for indirect or consequential damages."),
    "c5": ("governing_law", "This agreement is governed by the laws of Ireland."),
    "c6": ("assignment", "Neither party may assign this agreement without consent."),
}


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Adding a specialist", 1)[1].split("\n## ", 1)[0]


def _readme_entry() -> dict:
    snippet = _readme_section().split("```yaml\n", 1)[1].split("```", 1)[0]
    return YAML(typ="safe").load(snippet)[0]


def _readme_commands() -> list[list[str]]:
    """Every `cadre …` line of the section's bash blocks, comments dropped, in order."""
    commands = []
    for block in _readme_section().split("```bash\n")[1:]:
        for line in block.split("```", 1)[0].splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "cadre":
                commands.append(words[1:])
    return commands


def _write_project(root: Path, entry: dict, ports: dict[str, int]) -> Path:
    [source] = entry["sources"]
    data = root / source["path"]
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, (_, text) in CLAUSES.items()))
    suite = root / entry["evaluation"]["suite"]
    suite.mkdir(parents=True)
    ids = list(CLAUSES)
    splits = {"train": ids[:3], "dev": ids[3:5], "test": ids}
    for split, chosen in splits.items():
        (suite / f"{split}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "id": f"{split}-{i}",
                        "sentence": CLAUSES[i][1],
                        "clause_type": CLAUSES[i][0],
                        "relevant_ids": [i],
                    }
                )
                + "\n"
                for i in chosen
            )
        )
    document = {
        "version": 1,
        "project": {
            "name": "walk",
            "state_dir": "local-state",
            "mlflow": {"port": ports["mlflow"]},
            "prefect": {"port": ports["prefect"], "work_pool": "walk-pool"},
            "lm": {"port": ports["lm"]},
        },
        # The README says everything under `defaults:` is inherited: a small smoke budget keeps this test short
        # (3 test cases per evaluation, 10 LM calls to compile: what is checked is the walk, not the scores).
        "defaults": {
            "smoke": {
                "max_documents": 100,
                "max_eval_cases": 3,
                "max_train_steps": 2,
                "max_lm_calls": 10,
                "max_wall_seconds": 60,
            },
            "program": {
                "optimizer": {
                    "num_candidate_programs": 1,
                    "train_cases": 3,
                    "dev_cases": 2,
                    "max_bootstrapped_demos": 1,
                }
            },
        },
        "specialists": [entry],
    }
    path = root / "pipelines.yaml"
    with path.open("w") as handle:
        YAML().dump(document, handle)
    return path


def _cadre(args: list[str], config: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "CADRE_CONFIG"))}
    return subprocess.run(
        [*CADRE, *args, "-c", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent.parent,  # not the project folder: -c alone names the file
        env=env,
    )


def _processes_under(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if str(folder).encode() in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk") / "project"
    root.mkdir()
    ports = {"mlflow": free_port(), "prefect": free_port(), "lm": free_port()}
    config = _write_project(root, _readme_entry(), ports)
    up = _cadre(["up"], config)
    assert up.returncode == 0, up.stdout + up.stderr
    yield config, ports
    down = _cadre(["down"], config)
    for pid in _processes_under(root):  # never leave processes on the machine, even when failing
        os.kill(pid, signal.SIGKILL)
    assert down.returncode == 0, down.stderr


def test_the_readme_walk(project) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
    )

    config, ports = project
    api = f"http://127.0.0.1:{ports['prefect']}/api"
    name = _readme_entry()["name"]
    commands = _readme_commands()
    assert commands[:2] == [["validate"], ["deploy", "--paused"]], commands
    assert [c[:2] for c in commands[2:]] == [
        ["run", "reindex"],
        ["run", "optimize"],
        ["run", "refresh"],
        ["history", name],
    ]
    outputs = {}
    for command in commands:
        if command[:2] == ["run", "refresh"] and not os.environ.get("CADRE_WALK_REFRESH"):
            continue  # QLoRA on CPU: 5-10 min on a busy 2-core machine; tests/integration/test_refresh.py covers it
        result = _cadre(command, config)
        outputs[" ".join(command[:2])] = result.stderr
        assert result.returncode == 0, f"cadre {' '.join(command)} -c …:\n{result.stdout}{result.stderr}"
        if command[0] == "deploy":
            with SyncPrefectClient(api) as client:
                deployments = client.read_deployments(
                    deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["cadre", f"specialist:{name}"]))
                )
                schedules = [s for d in deployments for s in d.schedules]
            assert schedules and not any(s.active for s in schedules), "cadre deploy --paused left a schedule active"
            assert "every schedule is paused" in result.stderr

    with SyncPrefectClient(api) as client:
        optimize = client.read_deployment_by_name(f"optimize-prompts/{name}")
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[optimize.id]))
        )
        assert len(runs) == 1, [(r.name, r.tags) for r in runs]
        [run] = runs
        # Queued by Prefect: the re-index emitted cadre.index.promoted, the optimize deployment's trigger reacted.
        assert run.created_by is not None and run.created_by.display_value.endswith(
            "a promoted index starts optimize"
        ), (
            "the optimize that ran is not the one the promoted re-index queued",
            run.created_by,
        )
        assert run.state.is_completed()
    ran = outputs["run optimize"]
    assert f"already has flow run {run.name}" in " ".join(ran.split()), ran
    assert "figures:" in ran and "candidate" in ran, ran

    # cancel: a queued run of the specialist, by its name
    with SyncPrefectClient(api) as client:
        check = client.read_deployment_by_name(f"check/{name}")
        queued = client.create_flow_run_from_deployment(check.id)
    cancelled = _cadre(["cancel", queued.name, "-s", name], config)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancelled flow run {queued.name}" in cancelled.stderr
    with SyncPrefectClient(api) as client:
        assert client.read_flow_run(queued.id).state.is_cancelled()
    nothing = _cadre(["cancel", "optimize", "-s", name], config)
    assert nothing.returncode == 0 and "nothing to cancel" in nothing.stderr

    state = config.parent / "local-state"
    assert (state / ".gitignore").read_text().splitlines()[-1] == "*"
    status = _cadre(["status"], config)
    assert status.returncode == 0 and f"optimize-prompts/{name}" in status.stderr
    assert "latest optimize run" in " ".join(status.stderr.split()), status.stderr  # its test table, 95 % intervals
    assert "Test split:" in status.stderr, status.stderr
    # What a script reads: the same stack and champions as JSON, and the history as a list of events.
    report = json.loads(_cadre(["status", "--json"], config).stdout)
    assert report["healthy"] and report["champions"][name]["index"]["version"], report
    events = json.loads(_cadre(["history", name, "--json"], config).stdout)
    assert [e["event"] for e in events if e["kind"] == "index"][:1] == ["promotion"], events
