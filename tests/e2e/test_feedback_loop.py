"""The feedback loop end to end: serve the demo team, correct its wrong answers, learn them with DPO, serve the result.

A copy of the shipped `pipelines.yaml` (ports, index size and budgets reduced for CPU) runs in a
temporary project with its own MLflow (`cadre up --only mlflow`): the ICD-10 coder's index is built by
the real re-index engine, `cadre serve` answers train-split phrases, every wrong answer gets a
correction through `POST /v1/feedback`, and the learn-from-feedback flow runs in Prefect's test
harness. Then:

1. With no corrections yet the flow completes and says "not enough corrections".
2. After the corrections, the DPO candidate passes the `feedback` gate and is promoted; the running
   server swaps it in without a restart and now answers the corrected prompts correctly, while the
   regular test split does not regress.
3. A second round with deliberately wrong corrections and a destructive learning rate produces a
   candidate that regresses; the gate refuses it and the server keeps serving the previous champion.

Run: `python -m pytest -m e2e tests/e2e/test_feedback_loop.py -s` (several minutes on 2 cores: two DPO runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML
from support import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SPECIALIST = "icd10-coder"
ASKED = 16  # train-split phrases sent to the server in round one
MAX_CORRECTIONS = 8
EVAL_CASES = 10
DPO_STEPS = 6  # 8 pairs in batches of the specialist's tuning.batch_size (2 here): 1.5 epochs
POLL_S = 2


def _cases(split: str, count: int, skip_codes: set[str] = frozenset()) -> list[dict]:
    """The first `count` cases of a split with distinct codes (one phrase per code)."""
    found, codes = [], set(skip_codes)
    for line in (ROOT / "evals" / "suites" / "icd10-coder" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        if case["code"] not in codes:
            codes.add(case["code"])
            found.append(case)
        if len(found) == count:
            break
    return found


def _set_feedback(config: Path, **settings) -> None:
    yaml = YAML()
    document = yaml.load(config.read_text())
    document["specialists"][0]["feedback"].update(settings)
    with config.open("w") as handle:
        yaml.dump(document, handle)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo team on free ports, with a small real index holding the codes the test needs, and MLflow up."""
    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist
    from cadre.runtime.base_model import ensure_gguf, ensure_hf_model
    from cadre.tuning.adapter_export import ConverterMissingError, find_converter

    shipped = load_config(ROOT / "pipelines.yaml")
    ensure_gguf(shipped)
    ensure_hf_model(shipped)
    try:
        find_converter(shipped.state_dir)
    except ConverterMissingError as error:
        pytest.skip(f"llama.cpp's LoRA converter is not installed (setup.sh installs it): {error}")

    root = tmp_path_factory.mktemp("feedback-loop")
    shutil.copytree(ROOT / "evals", root / "evals", ignore=shutil.ignore_patterns("__pycache__"))
    yaml = YAML()
    document = yaml.load((ROOT / "pipelines.yaml").read_text())
    for service in ("mlflow", "prefect", "lm"):
        document["project"][service]["port"] = free_port()
    document["project"]["threads"] = {"torch": 2, "embedding": 1}
    coder = document["specialists"][0]
    needed = sorted({c["code"] for c in _cases("train", ASKED + 8) + _cases("test", EVAL_CASES)})
    coder["sources"][0]["options"]["priority_ids"] = needed
    coder["smoke"].update({"max_documents": 200, "max_eval_cases": EVAL_CASES, "max_train_steps": DPO_STEPS})
    coder["tuning"] = {"batch_size": 2}  # merged over the shared defaults
    coder["evaluation"]["bootstrap_samples"] = 200
    coder["feedback"] = {"min_pairs": 6, "max_steps": DPO_STEPS, "learning_rate": 1.0e-3, "beta": 0.1}
    config = root / "pipelines.yaml"
    with config.open("w") as handle:
        yaml.dump(document, handle)

    state = root / ".cadre"
    state.mkdir()
    (state / "models").symlink_to(shipped.state_dir / "models", target_is_directory=True)
    (state / "vendor").mkdir()
    (state / "vendor" / "llama.cpp").symlink_to(shipped.state_dir / "vendor" / "llama.cpp", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    up = subprocess.run(
        [sys.executable, "-m", "cadre.cli", "up", "--only", "mlflow", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    try:
        loaded = load_config(config)
        built = reindex_specialist(loaded, SPECIALIST, budget="smoke", show_progress=False)
        promote_version(loaded.state_dir, SPECIALIST, built.version)
        yield config
    finally:
        subprocess.run(
            [sys.executable, "-m", "cadre.cli", "down", "-c", str(config)],
            capture_output=True,
            timeout=120,
            cwd=root,
            env=env,
            check=False,
        )


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    log = (project.parent / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cadre.cli",
            "serve",
            "-c",
            str(project),
            "--port",
            str(port),
            "--poll-interval",
            str(POLL_S),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project.parent,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (project.parent / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cadre serve did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    saved = dict(os.environ)
    with prefect_test_harness():
        yield
    os.environ.clear()
    os.environ.update(saved)


def _ask(url: str, phrase: str) -> dict:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=300,
        json={"model": SPECIALIST, "messages": [{"role": "user", "content": phrase}]},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for_adapter(url: str, version: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/models", timeout=10).json()
        served = next(m for m in status["data"] if m["id"] == SPECIALIST)["cadre"].get("versions", {})
        if served.get("adapter") == version:
            return
        time.sleep(POLL_S / 2)
    pytest.fail(f"the server did not swap in adapter v{version} within {timeout_s} s")


def test_corrections_are_learned_promoted_and_served(project: Path, server: str, harness: None) -> None:
    from flows.learn_from_feedback import learn_from_feedback

    started = time.perf_counter()
    nothing = learn_from_feedback(SPECIALIST, str(project), budget="smoke")
    assert not nothing["promoted"] and nothing["summary"].startswith("not enough corrections (0 < 6)")

    corrected: dict[str, str] = {}
    right = 0
    for case in _cases("train", ASKED):
        answer = _ask(server, case["phrase"])
        assert answer["cadre"]["versions"]["adapter"] == "base"
        if answer["cadre"]["outputs"]["code"] == case["code"]:
            right += 1
            rating = httpx.post(f"{server}/v1/feedback", json={"response_id": answer["id"], "rating": 1}, timeout=30)
        elif len(corrected) < MAX_CORRECTIONS:
            corrected[case["phrase"]] = case["code"]
            rating = httpx.post(
                f"{server}/v1/feedback",
                json={"response_id": answer["id"], "rating": -1, "correction": case["code"]},
                timeout=30,
            )
        else:
            continue
        assert rating.status_code == 201, rating.text
    print(f"\nbase model: {right}/{ASKED} train phrases right; {len(corrected)} corrections posted")
    assert len(corrected) >= 6, "the base model answered too many phrases right to build the test"

    learned = learn_from_feedback(SPECIALIST, str(project), budget="smoke")
    scores = learned["scores"]
    print(
        f"round one: {learned['summary']}; DPO {learned['steps']} steps in {learned['train_seconds']:.0f} s; scores {scores}"
    )
    assert learned["promoted"] and learned["gate_passed"], learned
    assert learned["started_from"] == "fresh LoRA" and learned["champion_name"] == "base-model"
    assert scores["candidate_feedback"]["exact_match"] > scores["champion_feedback"]["exact_match"]
    assert scores["candidate_test"]["exact_match"] >= scores["champion_test"]["exact_match"] - 0.1, (
        "the regular suite did not regress"
    )

    _wait_for_adapter(server, learned["version"])
    now_right = 0
    for phrase, code in corrected.items():
        answer = _ask(server, phrase)
        assert answer["cadre"]["versions"]["adapter"] == learned["version"]
        now_right += answer["cadre"]["outputs"]["code"] == code
    print(
        f"served after promotion: {now_right}/{len(corrected)} corrected prompts answered correctly "
        f"(round one took {time.perf_counter() - started:.0f} s)"
    )
    assert now_right >= 0.75 * len(corrected)


def test_a_regressing_candidate_is_refused_and_the_champion_keeps_serving(
    project: Path, server: str, harness: None
) -> None:
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.registry.versions import registered_model_name
    from flows.learn_from_feedback import learn_from_feedback

    config = load_config(project)
    client = MlflowClient(config.project.mlflow.uri)
    name = registered_model_name(config.project.name, SPECIALIST, "adapter")
    champion = client.get_registered_model(name).aliases.get("champion")
    assert champion, "round one promoted a champion"

    used = {c["code"] for c in _cases("train", ASKED)}
    for case in _cases("train", 4, skip_codes=used):
        answer = _ask(server, case["phrase"])
        wrong = "Z99.89" if case["code"] != "Z99.89" else "A00.0"  # deliberately wrong "corrections"
        assert (
            httpx.post(
                f"{server}/v1/feedback",
                json={"response_id": answer["id"], "rating": -1, "correction": wrong},
                timeout=30,
            ).status_code
            == 201
        )
    _set_feedback(project, learning_rate=0.3, max_steps=3)  # destructive
    started = time.perf_counter()
    refused = learn_from_feedback(SPECIALIST, str(project), budget="smoke")
    print(f"\nround two: {refused['summary']}; scores {refused['scores']} ({time.perf_counter() - started:.0f} s)")
    assert not refused["promoted"] and not refused["gate_passed"], refused
    assert refused["started_from"] == "champion adapter" and refused["champion_name"] == f"adapter-v{champion}"
    assert client.get_registered_model(name).aliases.get("champion") == champion
    version = client.get_model_version(name, refused["version"])
    assert version.tags["cadre.gate"] == "refused"

    time.sleep(2 * POLL_S)
    assert _ask(server, _cases("train", 1)[0]["phrase"])["cadre"]["versions"]["adapter"] == champion
