"""The optimize-prompts flow end to end on real services: llama.cpp server, MLflow, Prefect, LanceDB.

A small ICD-10 project (a few hundred codes indexed by the real re-index engine, a suite cut from the
committed one) is compiled on the `smoke` budget with a tiny LM-call cap. The run registers the
program in a real MLflow registry, the gate decides from the scores the run logged, a second run with
the same inputs makes no LM call, and a dead LM endpoint fails the run with nothing registered.

Run: `python -m pytest -m integration tests/integration/test_optimize.py` (about 3–5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from cadre.platform.env import OFFLINE_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "evals" / "suites" / "icd10-coder"
SPECIALIST = "coder"
PROJECT = "optimizetest"
CASES = {"train": 16, "dev": 8, "test": 10}
LM_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def lm_server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama.cpp server (as `cadre up` starts it) on a free port; yields its /v1 URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("lm") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        "1",
        "--n_ctx",
        "2048",
        "--model_alias",
        "gemma3-270m",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV}, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + LM_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama.cpp server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _write_project(root: Path, mlflow_uri: str, lm_url: str) -> tuple[Path, dict[str, list[dict]]]:
    """A one-specialist ICD-10 project whose index holds every code its cases need, plus neighbours."""
    suite = root / "suite"
    suite.mkdir(parents=True)
    cases: dict[str, list[dict]] = {}
    for split, count in CASES.items():
        lines = (SUITE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (suite / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        cases[split] = [json.loads(line) for line in lines]
    codes = sorted({case["code"] for found in cases.values() for case in found})
    text = textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: state
          mlflow: {{tracking_uri: "{mlflow_uri}"}}
          prefect: {{port: {free_port()}}}
          lm: {{api_base: "{lm_url}", model: gemma3-270m}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: {SPECIALIST}
            description: maps a clinical phrase to its ICD-10-CM code
            sources:
              - kind: python
                name: icd10cm
                entrypoint: cadre.demo.icd10:load_documents
                options: {{billable_only: true, priority_ids: {json.dumps(codes)}}}
            program:
              instruction: Given a clinical phrase and candidate ICD-10-CM codes with their descriptions, answer with the single billable code that classifies the phrase.
              inputs: [{{name: phrase, description: a diagnosis as a clinician writes it}}]
              outputs: [{{name: code, description: one ICD-10-CM code}}]
              retrieve_k: 3
              max_tokens: 8
              optimizer: {{kind: bootstrap_random_search, max_bootstrapped_demos: 1, max_labeled_demos: 1, num_candidate_programs: 1}}
            evaluation:
              suite: suite
              answer_metrics: [exact_match, icd_hierarchy]
              retrieval_metrics: ["recall@1", "recall@3"]
              bootstrap_samples: 200
            gates:
              program:
                - {{metric: icd_hierarchy, at_least: 0.05}}
                - {{metric: exact_match, beat_champion_by: 0.0}}
            smoke: {{max_documents: 300, max_eval_cases: {CASES["test"]}, max_lm_calls: 30, max_wall_seconds: 240}}
        """)
    path = root / "pipelines.yaml"
    path.write_text(text, encoding="utf-8")
    return path, cases


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, lm_server: str) -> Path:
    """The project, with its index built and promoted by the real re-index engine."""
    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist

    path, _ = _write_project(tmp_path_factory.mktemp("optimize"), mlflow_server, lm_server)
    config = load_config(path)
    built = reindex_specialist(config, SPECIALIST, budget="smoke", show_progress=False)
    promote_version(config.state_dir, SPECIALIST, built.version)
    return path


def _run(client, run_id: str):
    return client.get_run(run_id)


def test_compile_register_gate_and_rerun_without_lm_calls(
    project: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    from mlflow import MlflowClient

    from cadre.registry.versions import registered_model_name
    from flows.optimize_prompts import optimize_prompts

    client = MlflowClient(mlflow_server)
    first = optimize_prompts(SPECIALIST, str(project), budget="smoke")
    run = _run(client, first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert 0 < metrics["compile_lm_calls"] <= metrics["compile_lm_requests"] <= 30, "the smoke cap bounds the compile"
    assert metrics["candidate_cases"] == CASES["test"] and metrics["baseline_cases"] == CASES["test"]
    assert metrics["test_candidate_lm_calls"] + metrics["test_baseline_lm_calls"] > 0

    # The gate decided from the scores the run logged: the absolute rule is the only one without a champion.
    expected = "passed" if metrics["candidate_icd_hierarchy"] >= 0.05 else "refused"
    name = registered_model_name(PROJECT, SPECIALIST, "program")
    version = client.get_model_version(name, first["version"])
    assert version.tags["cadre.gate"] == expected == run.data.tags["cadre.gate"]
    assert "Gate `program`" in version.description
    assert version.tags["cadre.lineage.program_sha256"] == run.data.params["optimize.program_sha256"]
    champion = client.get_registered_model(name).aliases.get("champion")
    assert champion == (first["version"] if expected == "passed" else None)
    local = client.download_artifacts(run.info.run_id, "program/program.json")
    assert json.loads(Path(local).read_text())["answer"]["signature"]["instructions"]
    prompt = client.load_prompt(run.data.tags["cadre.prompt_uri"])
    assert prompt.template.startswith("Given a clinical phrase")

    second = optimize_prompts(SPECIALIST, str(project), budget="smoke")
    rerun = _run(client, second["mlflow_run_id"]).data.metrics
    assert rerun["compile_lm_calls"] == 0 and rerun["compile_lm_cache_hits"] == metrics["compile_lm_requests"]
    assert rerun["test_candidate_lm_calls"] == 0 and rerun["test_baseline_lm_calls"] == 0
    quality = ("exact_match", "icd_hierarchy", "recall@1", "recall@3")  # latencies differ: answers come from the cache
    assert {m: second["candidate"][m] for m in quality} == {m: first["candidate"][m] for m in quality}
    if expected == "passed":
        assert second["event"] == "unchanged" and second["champion"] == first["version"]
    else:
        assert second["version"] == first["version"], "an identical program reuses its version"


def test_unreachable_lm_fails_the_run_and_promotes_nothing(
    project: Path, mlflow_server: str, harness: None, clean_environment: None, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from cadre.registry.runs import experiment_name
    from cadre.runtime.lm import LMUnavailable
    from flows.optimize_prompts import optimize_prompts

    dead = f"http://127.0.0.1:{free_port()}/v1"
    text = project.read_text(encoding="utf-8")
    before = text.split('api_base: "')[1].split('"')[0]
    broken = project.with_name("dead-lm.yaml")
    broken.write_text(text.replace(before, dead).replace(f"name: {PROJECT}", f"name: {PROJECT}-dead"), encoding="utf-8")
    with pytest.raises(LMUnavailable, match="unreachable; nothing was compiled or promoted"):
        optimize_prompts(SPECIALIST, str(broken), budget="smoke")
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(experiment_name(_config(broken), SPECIALIST))
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not client.search_registered_models(filter_string=f"name LIKE '{PROJECT}-dead.%'")


def test_the_answer_mode_and_depth_are_chosen_on_dev_and_the_program_must_beat_the_retriever(
    project: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    """The same project and index under another name, whose program tries free and constrained answers on the dev
    split, and whose gate requires beating the first hit's id on the test cases. It declares depths 1 and 3 too; a
    smoke run tries the answer modes at the serving depth (3) only."""
    from mlflow import MlflowClient

    from cadre.registry.versions import registered_model_name
    from flows.optimize_prompts import optimize_prompts

    text = project.read_text(encoding="utf-8")
    changed = (
        text.replace(f"name: {PROJECT}", f"name: {PROJECT}-answers")
        .replace(
            "num_candidate_programs: 1}",
            "num_candidate_programs: 1, answer_modes: [free, constrained], retrieve_k: [1, 3]}",
        )
        .replace("{metric: exact_match, beat_champion_by: 0.0}", "{metric: exact_match, beat_baseline: retrieval}")
    )
    assert changed.count("answer_modes") == 1 and changed.count("beat_baseline") == 1
    path = project.with_name("answers.yaml")
    path.write_text(changed, encoding="utf-8")

    result = optimize_prompts(SPECIALIST, str(path), budget="smoke")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    mode, depth = run.data.params["optimize.answer_mode"], run.data.params["optimize.retrieve_k"]
    assert mode in ("free", "constrained") and depth == "3"

    summary = _artifact_text(client, run.info.run_id, "summary.md")
    assert "retrieval only (its top-1 document as the answer) | " in summary
    assert f"| candidate (answers {mode}, {depth} passages) | " in summary
    assert f"Chosen on {CASES['dev']} dev cases" in summary and "(kept)" in summary
    program = json.loads(Path(client.download_artifacts(run.info.run_id, "program/program.json")).read_text())
    if (mode, depth) != ("free", "3"):  # the declared program answers free from 3 passages
        assert program["cadre"] == {"answer_mode": mode, "retrieve_k": int(depth)}
    if mode == "constrained":  # no answer outside the retrieved ids on any test case
        results = json.loads(_artifact_text(client, run.info.run_id, "test_results.json"))
        examples = results["candidate"]["examples"]
        assert all(e["output"] in e["retrieved_ids"] for e in examples if e["output"])

    # The gate judged the candidate against retrieval alone on the same cases.
    metrics = run.data.metrics
    beats = metrics["candidate_exact_match"] >= metrics["retrieval_only_exact_match"] - 1e-9
    expected = "passed" if beats and metrics["candidate_icd_hierarchy"] >= 0.05 else "refused"
    version = client.get_model_version(
        registered_model_name(f"{PROJECT}-answers", SPECIALIST, "program"), result["version"]
    )
    assert version.tags["cadre.gate"] == expected
    assert "exact_match beats retrieval only by ≥ 0" in version.description
    assert "vs retrieval-top1: gain" in version.description


def _artifact_text(client, run_id: str, name: str) -> str:
    """A file the prompt flow logged to its run's evaluation folder."""
    for folder in ("eval", "evaluation"):
        found = [a.path for a in client.list_artifacts(run_id, folder) if a.path.endswith("/" + name)]
        if found:
            return Path(client.download_artifacts(run_id, found[0])).read_text(encoding="utf-8")
    raise AssertionError(f"{name} was not logged")


def _config(path: Path):
    from cadre.config import load_config

    return load_config(path)
