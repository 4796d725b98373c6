"""The refresh-adapter flow end to end on real services: the 270M model, MLflow, Prefect, LanceDB, llama.cpp.

A small ICD-10 project (a few hundred codes indexed by the real re-index engine, a suite cut from
the committed one) is refreshed twice on the `smoke` budget: first QLoRA (4-bit nf4 on CPU), then
LoRA. Each run streams its loss to a real MLflow server, exports the adapter to GGUF, runs the
specialist with it through llama.cpp, and the gate decides from the scores it logged; the second run
is compared with the first one's adapter if that was promoted, else with the bare base model. A
training process killed with SIGKILL after a checkpoint resumes from it.

Run: `python -m pytest -m integration tests/integration/test_refresh.py` (about 3–5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cadre.platform.env import OFFLINE_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "evals" / "suites" / "icd10-coder"
SPECIALIST = "coder"
PROJECT = "refreshtest"
CASES = {"train": 120, "dev": 4, "test": 12}
STEPS = 4
KILL_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def prepared_models() -> Path:
    """The repo's prepared models (the packaged GGUF and its safetensors), prepared now if missing."""
    from cadre.config import load_config
    from cadre.runtime.base_model import ensure_gguf, ensure_hf_model

    config = load_config(REPO / "pipelines.yaml")
    ensure_gguf(config)
    ensure_hf_model(config)
    return config.state_dir


def _write_project(
    root: Path, mlflow_uri: str, method: str, name: str, search: str = "", program: str = "", gates: str = ""
) -> Path:
    """A one-specialist ICD-10 project whose index holds every code its cases need, plus neighbours."""
    suite = root / "suite"
    suite.mkdir(parents=True, exist_ok=True)
    codes: set[str] = set()
    for split, count in CASES.items():
        lines = (SUITE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (suite / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        codes |= {json.loads(line)["code"] for line in lines}
    text = textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: state
          mlflow: {{tracking_uri: "{mlflow_uri}"}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: {SPECIALIST}
            description: maps a clinical phrase to its ICD-10-CM code
            sources:
              - kind: python
                name: icd10cm
                entrypoint: cadre.demo.icd10:load_documents
                options: {{billable_only: true, priority_ids: {json.dumps(sorted(codes))}}}
            program:
              instruction: Given a clinical phrase and candidate ICD-10-CM codes with their descriptions, answer with the single billable code that classifies the phrase.
              inputs: [{{name: phrase, description: a diagnosis as a clinician writes it}}]
              outputs: [{{name: code, description: one ICD-10-CM code}}]
              retrieve_k: 3
              max_tokens: 8{program}
            tuning: {{method: {method}, rank: 8, alpha: 16, learning_rate: 1.0e-3, max_steps: 300, batch_size: 2, max_length: 192,
                      checkpoint_every: 2, heldout_fraction: 0.05{search}}}
            evaluation:
              suite: suite
              answer_metrics: [exact_match, icd_hierarchy]
              retrieval_metrics: ["recall@1", "recall@3"]
              bootstrap_samples: 200
            gates:
              adapter:
                - {{metric: exact_match, beat_champion_by: 0.0}}{gates}
            smoke: {{max_documents: 400, max_eval_cases: {CASES["test"]}, max_train_steps: {STEPS}, decoding_dev_cases: 4}}
        """)
    path = root / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def project_root(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, prepared_models: Path) -> Path:
    """The project folder, its index built and promoted by the real re-index engine; the prepared models shared.

    The GGUF converter is found where setup.sh installs it (inside the virtualenv).
    """
    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist

    root = tmp_path_factory.mktemp("refresh")
    path = _write_project(root, mlflow_server, "qlora", "qlora.yaml")
    state = root / "state"
    state.mkdir()
    (state / "models").symlink_to(prepared_models / "models", target_is_directory=True)
    config = load_config(path)
    built = reindex_specialist(config, SPECIALIST, budget="smoke", show_progress=False)
    promote_version(config.state_dir, SPECIALIST, built.version)
    return root


def _check_refresh_run(client, result: dict, method: str, champion_before: str | None) -> None:
    """What a reviewer relies on: the loss per step, the adapter and its lineage, a gate decided from logged scores."""
    from cadre.registry.versions import registered_model_name

    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.method"] == method and run.data.params["train.device"] == "cpu"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(point.step for point in history) == list(range(1, STEPS + 1))
    assert all(point.value == point.value and 0 < point.value < 50 for point in history), "finite, sane loss per step"
    metrics = run.data.metrics
    assert metrics["train_global_step"] == STEPS and metrics["data_train"] >= STEPS * 2
    assert 0.0 <= metrics["gguf_peft_agreement"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter.gguf",
        "adapter/training_config.json",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "training")} >= {
        "training/loss_curve.png",
        "training/loss_curve.csv",
    }

    # The gate decided from the scores this run logged, against the champion adapter or the bare base model.
    candidate, champion = metrics["candidate_exact_match"], metrics["champion_exact_match"]
    assert metrics["candidate_cases"] == CASES["test"] == metrics["champion_cases"]
    expected = "passed" if candidate >= champion - 1e-9 else "refused"
    name = registered_model_name(PROJECT, SPECIALIST, "adapter")
    version = client.get_model_version(name, result["version"])
    assert version.tags["cadre.gate"] == expected == run.data.tags["cadre.gate"]
    assert result["champion_name"] == (f"adapter-v{champion_before}" if champion_before else "base-model")
    assert (
        version.tags["cadre.lineage.data_fingerprint"]
        == run.data.tags["cadre.data_fingerprint"]
        == result["data_fingerprint"]
    )
    assert version.tags["cadre.lineage.base_model"].startswith("gemma3-270m@")
    assert version.tags["cadre.lineage.program_version"] == "declared"
    assert version.tags["cadre.lineage.parent_versions"].startswith(f"adapter:{champion_before or '-'}")
    assert client.get_registered_model(name).aliases.get("champion") == (
        result["version"] if expected == "passed" else champion_before
    )


def test_qlora_then_lora_refresh_log_register_and_gate(
    project_root: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    from mlflow import MlflowClient

    from cadre.registry.versions import registered_model_name
    from flows.refresh_adapter import refresh_adapter

    client = MlflowClient(mlflow_server)
    name = registered_model_name(PROJECT, SPECIALIST, "adapter")
    first = refresh_adapter(SPECIALIST, str(project_root / "qlora.yaml"), budget="smoke")
    _check_refresh_run(client, first, "qlora", None)

    champion = client.get_registered_model(name).aliases.get("champion")
    lora = _write_project(project_root, mlflow_server, "lora", "lora.yaml")
    second = refresh_adapter(SPECIALIST, str(lora), budget="smoke")
    _check_refresh_run(client, second, "lora", champion)
    assert second["data_fingerprint"] == first["data_fingerprint"], "same data, rendered the same way"
    assert second["version"] != first["version"]


SEARCH = (
    ", search: {smoke_trials: 3, trials: 8, dev_cases: 4, "
    "space: {learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}, rank: [4, 8]}}"
)


def test_the_refresh_searches_its_own_settings_and_trains_the_best(
    project_root: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    """Trials are nested runs scored on dev; the declared settings are trial 0; the candidate is the best trial's
    adapter, reused rather than trained again; a second run finds the finished study and trains nothing new."""
    from mlflow import MlflowClient

    from flows.refresh_adapter import refresh_adapter

    client = MlflowClient(mlflow_server)
    path = _write_project(project_root, mlflow_server, "lora", "search.yaml", search=SEARCH)
    result = refresh_adapter(SPECIALIST, str(path), budget="smoke")
    run = client.get_run(result["mlflow_run_id"])
    metrics, params = run.data.metrics, run.data.params
    assert metrics["search_trials"] == 3 and metrics["search_complete"] + metrics["search_pruned"] >= 2
    assert "search_declared_dev_exact_match" in metrics and "search_best_dev_exact_match" in metrics
    assert metrics["search_best_dev_exact_match"] >= metrics["search_declared_dev_exact_match"]
    assert result["search"].startswith("hyperparameter search: 3 trials")

    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 3, [c.data.tags.get("mlflow.runName") for c in children]
    by_trial = {int(c.data.tags["cadre.trial"]): c for c in children}
    declared = by_trial[0]
    assert float(declared.data.params["learning_rate"]) == 1.0e-3 and declared.data.params["rank"] == "8"
    for child in children:
        state = child.data.tags["cadre.trial_state"]
        assert state in ("complete", "pruned", "failed")
        if state == "complete":
            assert child.info.status == "FINISHED" and "dev_exact_match" in child.data.metrics
            assert client.get_metric_history(child.info.run_id, "train/loss"), "each trial's loss by step"

    # The candidate is the best trial's adapter: same settings, and its training was found done, not rerun.
    best = by_trial[int(params["search.best_trial"])]
    assert params["train.reused"] == "true"
    local = Path(client.download_artifacts(run.info.run_id, "adapter/training_config.json"))
    tuning = json.loads(local.read_text())["tuning"]
    assert tuning["rank"] == int(best.data.params["rank"])
    assert abs(tuning["learning_rate"] - float(best.data.params["learning_rate"])) < 1e-12
    table = Path(client.download_artifacts(run.info.run_id, "search/trials.md")).read_text()
    assert "(declared)" in table and "**best**" in table

    # Run again: the study is finished, so no trial trains; the same best settings come back.
    again = refresh_adapter(SPECIALIST, str(path), budget="smoke")
    rerun = client.get_run(again["mlflow_run_id"])
    assert rerun.data.params["search.best_trial"] == params["search.best_trial"]
    assert "3 from an earlier run of this study" in again["search"]
    assert not client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rerun.info.run_id}'"
    ), "a finished study trains no trial again"


CHOOSING = {
    # A 2-trial search too: each trial answers its dev cases each way the refresh tries and counts its best.
    "search": ", decoding_dev_cases: 4, search: {smoke_trials: 2, trials: 2, dev_cases: 4, space: {rank: [4, 8]}}",
    # Served: the model writes the code, in one token, so never a whole code. Tried with the candidate: the
    # retriever's first code (score, weight 100), which is right on some dev cases: the candidate must answer that way.
    "program": "\n              optimizer: {answer_modes: [free, score], retrieval_weights: [100]}",
    "gates": "\n              program:\n                - {metric: exact_match, beat_baseline: retrieval}",
}


def test_an_adapter_that_serves_best_answering_another_way_is_promoted_with_that_program(
    project_root: Path, mlflow_server: str, harness: None, clean_environment: None
) -> None:
    """`tuning.decoding_dev_cases`: the answer modes of `optimizer.answer_modes` are tried on dev with the candidate
    (the serving one first); the candidate is judged on test answering the best way; promoted, the program answering
    that way is registered and promoted beside it, its lineage naming the adapter."""
    from mlflow import MlflowClient

    from cadre.registry.versions import get_champion, registered_model_name
    from cadre.runtime.serving_prompt import read_serving_prompt
    from flows.refresh_adapter import refresh_adapter

    client = MlflowClient(mlflow_server)
    path = _write_project(project_root, mlflow_server, "lora", "choosing.yaml", **CHOOSING)
    path.write_text(path.read_text().replace("max_tokens: 8", "max_tokens: 1"))
    programs = registered_model_name(PROJECT, SPECIALIST, "program")
    result = refresh_adapter(SPECIALIST, str(path), budget="smoke")
    note = client.get_run(result["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert "Answer mode on 4 dev cases with the candidate adapter" in note
    assert "| free k=3 (serving) |" in note and "| score (retrieval weight 100) k=3 |" in note
    assert result["answer_mode"] == "score (retrieval weight 100) k=3"
    assert result["promoted"] and result["program"]["promoted"], (result["summary"], result["program"])
    trials = client.search_runs(
        [client.get_run(result["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'",
    )
    assert len(trials) == 2, "the search ran its 2 trials"
    for trial in trials:  # scored as the refresh would serve it: its best answer mode, not the serving one
        figures = trial.data.metrics
        assert trial.data.tags["cadre.trial_answer"] == "score (retrieval weight 100) k=3", trial.data.tags
        assert (
            figures["dev_exact_match"] == figures["dev_score_w100_k3_exact_match"] > figures["dev_free_k3_exact_match"]
        )
    champion = get_champion(client, PROJECT, SPECIALIST, "program")
    assert champion is not None and str(champion.version) == str(result["program"]["version"])
    assert champion.tags["cadre.lineage.parent_versions"] == f"program:declared,adapter:{result['version']}"
    local = client.download_artifacts(champion.run_id, "program/program.json")
    from cadre.config import load_config

    settings = load_config(path).specialist(SPECIALIST).program
    served = read_serving_prompt(settings, local)
    assert (served.answer_mode, served.retrieve_k, served.retrieval_weight) == ("score", 3, 100.0)
    assert champion.run_id == result["mlflow_run_id"], "registered from the refresh run"
    run_tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert (
        run_tags["cadre.candidate_version"]
        == f"{registered_model_name(PROJECT, SPECIALIST, 'adapter')}/{result['version']}"
    )
    assert str(champion.version) in {v.version for v in client.search_model_versions(f"name='{programs}'")}


TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
from cadre.config import load_config
from cadre.tuning.finetune import train_adapter
from cadre.runtime.prompt import PromptSpec
from cadre.tuning.training_data import build_training_data, read_records, token_counter
from transformers import AutoTokenizer

config = load_config(sys.argv[1])
settings = config.specialist("coder")
hf_dir = config.state_dir / "models" / "gemma3-270m" / "hf"
spec = PromptSpec.from_settings(settings.program.model_copy(update={"retrieve_k": 0}))
records, skipped = read_records([config.resolve(settings.evaluation.suite) / "train.jsonl"])
data = build_training_data(records, spec, count_tokens=token_counter(AutoTokenizer.from_pretrained(hf_dir)), max_length=128,
                           heldout_fraction=0.05, seed=0, max_examples=40)
result = train_adapter(data, settings.tuning, base_model_dir=hf_dir, work_dir=Path(sys.argv[2]), max_steps=int(sys.argv[3]), threads=1,
                       progress_bar=False)
print("RESULT " + json.dumps({"global_step": result.global_step, "resumed_from_step": result.resumed_from_step,
                             "steps": [row["step"] for row in result.loss_curve]}), flush=True)
"""


def _train(project: Path, folder: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, str(project), str(folder), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        cwd=REPO,
        start_new_session=True,
    )


def test_a_training_killed_after_a_checkpoint_resumes_from_it(project_root: Path, tmp_path: Path) -> None:
    project = _write_project(project_root, "http://127.0.0.1:9", "lora", "kill.yaml")  # MLflow is not used here
    folder = tmp_path / "work"
    steps = 8
    victim = _train(project, folder, steps)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not (folder / "checkpoint-2" / "trainer_state.json").exists():
            assert victim.poll() is None, f"training ended before its first checkpoint:\n{victim.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.1)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (folder / "final").exists(), "killed before it could finish"
    checkpoints = sorted(
        int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )
    assert checkpoints and checkpoints[-1] < steps

    survivor = _train(project, folder, steps)
    output, _ = survivor.communicate(timeout=KILL_TIMEOUT_S)
    assert survivor.returncode == 0, output[-3000:]
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["resumed_from_step"] == checkpoints[-1] > 0, "resumed from the last checkpoint, not from step 0"
    assert result["global_step"] == steps
    assert result["steps"] == [float(s) for s in range(1, steps + 1)], "the loss history of the killed run is kept"
    assert f"resuming from checkpoint-{checkpoints[-1]}" in output
