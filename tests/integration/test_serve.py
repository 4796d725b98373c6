"""`cadre serve` for real: a subprocess on a free port, a real MLflow registry, the 270M GGUF, a LanceDB index.

A two-specialist project (an ICD-10 coder that retrieves from a small real index, and a retrieval-free
QA specialist) is served; the tests send plain, streaming and `auto` requests and bad ones, check
that answers equal the DSPy program's own on the same champions, post feedback, and move the
`adapter` and `program` champions while a client keeps sending requests: the server swaps them in
without a restart and no request fails.

Run: `python -m pytest -m integration tests/integration/test_serve.py` (about 3–5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "evals" / "suites" / "icd10-coder"
PROJECT = "servetest"
PHRASES = ["Reticular erythematous mucinosis", "Ethmoidal polyp of sinus", "Viral oral mucositis (ulcerative)"]
POLL_S = 2
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def prepared_models() -> Path:
    from cadre.config import load_config
    from cadre.runtime.base_model import ensure_gguf, ensure_hf_model
    from cadre.tuning.adapter_export import ConverterMissingError, find_converter

    config = load_config(REPO / "pipelines.yaml")
    ensure_gguf(config)
    ensure_hf_model(config)
    try:
        find_converter(config.state_dir)
    except ConverterMissingError as error:
        pytest.skip(f"llama.cpp's LoRA converter is not installed (setup.sh installs it): {error}")
    return config.state_dir


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, prepared_models: Path) -> Path:
    """The project file, its coder index built and made live by the real re-index engine."""
    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist

    root = tmp_path_factory.mktemp("serve")
    suite = root / "suite"
    suite.mkdir()
    lines = (SUITE / "test.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    for split in ("train", "dev", "test"):
        (suite / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    codes = sorted({json.loads(line)["code"] for line in lines})
    (root / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: state
          mlflow: {{tracking_uri: "{mlflow_server}"}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: coder
            description: >-
              Medical coding: maps a clinical phrase (a diagnosis as a clinician writes it) to the
              billable ICD-10-CM code that classifies it.
            examples: ["Which ICD-10 code is typhoid endocarditis?", "code for acute appendicitis with generalized peritonitis"]
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
            evaluation: {{suite: suite, answer_metrics: [exact_match], retrieval_metrics: ["recall@3"]}}
            smoke: {{max_documents: 60}}
          - name: qa
            description: General knowledge questions about geography, such as the capital city of a country.
            examples: ["What is the capital of France?"]
            program:
              instruction: Answer the question with a short phrase.
              inputs: [{{name: question}}]
              outputs: [{{name: answer}}]
              retrieve_k: 0
              max_tokens: 12
            evaluation: {{suite: suite}}
        """)
    )
    state = root / "state"
    state.mkdir()
    (state / "models").symlink_to(prepared_models / "models", target_is_directory=True)
    (state / "vendor").mkdir()
    (state / "vendor" / "llama.cpp").symlink_to(prepared_models / "vendor" / "llama.cpp", target_is_directory=True)
    config = load_config(root / "pipelines.yaml")
    built = reindex_specialist(config, "coder", budget="smoke", show_progress=False)
    promote_version(config.state_dir, "coder", built.version)
    return root / "pipelines.yaml"


def _register_adapter(config_path: Path, seed: int) -> str:
    """A random (non-zero) LoRA adapter, exported to GGUF, logged to a run and registered as a `coder` adapter version."""
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.registry.versions import register_candidate
    from cadre.tuning.adapter_export import random_adapter

    config = load_config(config_path)
    hf = config.state_dir / "models" / "gemma3-270m" / "hf"
    exported = random_adapter(hf, config.state_dir / "work" / f"adapter-{seed}", config.state_dir, seed)
    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(PROJECT) or client.get_experiment(client.create_experiment(PROJECT))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(exported.folder), "adapter")
    client.set_terminated(run.info.run_id)
    version = register_candidate(
        client,
        project=PROJECT,
        specialist="coder",
        kind="adapter",
        run_id=run.info.run_id,
        artifact_path="adapter",
        lineage={"base_model": "gemma3-270m"},
        actor="test",
    )
    return str(version.version)


def _register_program(config_path: Path) -> str:
    """A program with one labeled demo (a different prompt than the declared one), registered as a `coder` program version."""
    import dspy
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.prompts.program import SpecialistProgram, save_program
    from cadre.registry.versions import register_candidate

    config = load_config(config_path)
    settings = config.specialist("coder").program
    program = SpecialistProgram(settings, retriever=lambda query, k: [])
    program.answer.demos = [
        dspy.Example(
            context=["A01.02 — Typhoid fever with heart involvement"], phrase="typhoid endocarditis", code="A01.02"
        )
    ]
    folder = config.state_dir / "work" / "program"
    save_program(program, folder / "program.json")
    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(PROJECT) or client.get_experiment(client.create_experiment(PROJECT))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "program")
    client.set_terminated(run.info.run_id)
    version = register_candidate(
        client,
        project=PROJECT,
        specialist="coder",
        kind="program",
        run_id=run.info.run_id,
        artifact_path="program",
        lineage={"base_model": "gemma3-270m"},
        actor="test",
    )
    return str(version.version)


def _promote(config_path: Path, kind: str, version: str) -> None:
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.registry.versions import promote

    config = load_config(config_path)
    promote(
        MlflowClient(config.project.mlflow.uri),
        project=PROJECT,
        specialist="coder",
        kind=kind,
        version=version,
        actor="test",
        force=True,
        reason="integration test moves the champion by hand",
    )


@pytest.fixture(scope="module")
def adapters(project: Path) -> list[str]:
    first, second = _register_adapter(project, 1), _register_adapter(project, 2)
    _promote(project, "adapter", first)
    return [first, second]


@pytest.fixture(scope="module")
def server(project: Path, adapters: list[str]) -> Iterator[tuple[str, subprocess.Popen]]:
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
            "--max-in-flight",
            "6",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project.parent,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"cadre serve exited with {process.returncode}:\n{(project.parent / 'serve.log').read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"cadre serve not ready after {START_TIMEOUT_S} s:\n{(project.parent / 'serve.log').read_text()[-4000:]}"
                )
            time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()


def _chat(url: str, model: str, content: str, **extra) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
        timeout=120,
    )


def test_answers_carry_id_specialist_and_versions(server, adapters) -> None:
    url, _ = server
    response = _chat(url, "coder", PHRASES[0])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["cadre"]["specialist"] == "coder" == response.headers["x-cadre-specialist"]
    versions = body["cadre"]["versions"]
    assert versions["adapter"] == adapters[0] == response.headers["x-cadre-adapter-version"]
    assert versions["program"] == "declared" and versions["index"].startswith("v")
    assert len(body["cadre"]["retrieved_ids"]) == 3
    assert body["choices"][0]["message"]["content"] == (body["cadre"]["outputs"]["code"] or "")
    assert body["usage"]["prompt_tokens"] > 50

    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert {m["id"] for m in models["data"]} == {"coder", "qa", "auto"}


def test_answer_equals_the_program_run_by_dspy_on_the_same_champions(server, project, adapters) -> None:
    """The server renders and generates itself (to stream); it must answer exactly what the DSPy program answers."""
    from cadre.config import load_config
    from cadre.prompts.program import (
        CompletionLM,
        IndexTarget,
        SpecialistProgram,
        open_retriever,
        program_context,
    )
    from cadre.runtime.lm import LlamaCppClient

    url, _ = server
    config = load_config(project)
    settings = config.specialist("coder").program
    gguf = next((config.state_dir / "serving" / "coder" / f"adapter-v{adapters[0]}").rglob("*.gguf"))
    client = LlamaCppClient(
        config.state_dir / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf", lora_path=gguf, n_threads=1
    )
    lm = CompletionLM(client, model_id="equivalence-check", max_tokens=settings.max_tokens, cache=False)
    program = SpecialistProgram(settings, open_retriever(IndexTarget.from_config(config, "coder")))
    for phrase in PHRASES:
        with program_context(lm, settings):
            expected = program(phrase=phrase)
        served = _chat(url, "coder", phrase).json()
        assert served["cadre"]["outputs"]["code"] == expected.code, phrase
        assert served["cadre"]["retrieved_ids"] == expected.retrieved_ids, phrase


def test_streaming_sends_openai_chunks_that_add_up_to_the_answer(server) -> None:
    url, _ = server
    plain = _chat(url, "qa", "What is the capital of Italy?").json()
    chunks = []
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=120,
        json={
            "model": "qa",
            "stream": True,
            "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-cadre-specialist"] == "qa"
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == plain["choices"][0]["message"]["content"] and len(events) >= 3
    final = events[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["cadre"]["versions"] == plain["cadre"]["versions"] and final["usage"]["completion_tokens"] > 0


def test_auto_routes_by_meaning_and_refuses_what_matches_nothing(server) -> None:
    url, _ = server
    routed = _chat(url, "auto", "ICD-10 code for chronic lactic acidosis")
    assert routed.status_code == 200, routed.text
    assert routed.json()["cadre"]["routing"]["specialist"] == "coder" == routed.headers["x-cadre-specialist"]
    assert _chat(url, "auto", "What is the capital city of Spain?").json()["cadre"]["specialist"] == "qa"
    refused = _chat(url, "auto", "write me a limerick about a jazz-loving cat")
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "no_matching_specialist" and set(error["scores"]) == {"coder", "qa"}


def test_bad_requests_get_4xx_and_the_server_stays_up(server) -> None:
    url, process = server

    def post(body, **kw):
        return httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30, **kw)

    assert post(b"{nope").status_code == 400
    assert _chat(url, "nobody", "x").status_code == 404
    assert (
        post(json.dumps({"model": "qa", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()).status_code
        == 413
    )
    assert _chat(url, "qa", "y" * 4001).status_code == 400
    assert (
        httpx.post(f"{url}/v1/feedback", json={"response_id": "chatcmpl-never", "rating": -1}, timeout=30).status_code
        == 404
    )
    assert process.poll() is None
    assert _chat(url, "qa", "What is the capital of France?").status_code == 200


def test_feedback_is_stored_with_the_response_it_rates(server, project) -> None:
    from cadre.config import load_config
    from cadre.feedback.store import open_store, store_url_for

    url, _ = server
    answer = _chat(url, "coder", PHRASES[1]).json()
    stored = httpx.post(
        f"{url}/v1/feedback", json={"response_id": answer["id"], "rating": -1, "correction": "J33.8"}, timeout=30
    )
    assert stored.status_code == 201, stored.text
    config = load_config(project)
    records = open_store(store_url_for(config, "coder")).feedback("coder")
    mine = [r for r in records if r.response_id == answer["id"]]
    assert mine and mine[0].correction == {"code": "J33.8"}
    assert mine[0].response["answer"] == answer["choices"][0]["message"]["content"]
    assert mine[0].response["adapter_version"] == answer["cadre"]["versions"]["adapter"]


def test_champion_moves_go_live_without_restart_and_no_request_fails(server, project, adapters) -> None:
    url, process = server
    pid = process.pid
    results: list[tuple[int, dict[str, str]]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                response = client.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "coder", "messages": [{"role": "user", "content": PHRASES[2]}]},
                )
                versions = response.json().get("cadre", {}).get("versions", {}) if response.status_code == 200 else {}
                results.append((response.status_code, versions))

    def served_versions_become(kind: str, version: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if results and results[-1][1].get(kind) == version:
                return
            time.sleep(0.2)
        pytest.fail(f"{kind} v{version} was not served within {timeout_s} s; last: {results[-1:]}")

    clients = [threading.Thread(target=keep_asking) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        served_versions_become("adapter", adapters[0])
        _promote(project, "adapter", adapters[1])
        served_versions_become("adapter", adapters[1])
        program_version = _register_program(project)
        _promote(project, "program", program_version)
        served_versions_become("program", program_version)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    assert process.poll() is None and process.pid == pid, "the server was not restarted"
    statuses = [status for status, _ in results]
    assert statuses and all(status == 200 for status in statuses), statuses
    seen = {(v["adapter"], v["program"]) for _, v in results}
    assert {(adapters[0], "declared"), (adapters[1], "declared"), (adapters[1], program_version)} <= seen
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["watcher"]["swaps"] >= 2 and health["watcher"]["last_error"] is None
    assert health["engines"][0]["adapters_loaded"] == 1, "the replaced adapter was freed once its last request finished"


def test_hostile_text_is_a_400_and_a_poisoned_correction_stores_nothing(server, project) -> None:
    """Issue 19: a lone surrogate crashed the router's tokenizer (500) and, in a correction, was stored anyway."""
    from cadre.config import load_config
    from cadre.feedback.store import open_store, store_url_for

    url, process = server

    def post(path: str, body: bytes) -> httpx.Response:
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)

    for model in ("auto", "qa", "coder"):
        response = post(
            "/v1/chat/completions",
            b'{"model": "%s", "messages": [{"role": "user", "content": "gout \\ud800"}]}' % model.encode(),
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_text", response.text
    nested = b'{"model": "qa", "messages": ' + b"[" * 25_000 + b"]" * 25_000 + b"}"
    assert post("/v1/chat/completions", nested).status_code == 400
    answer = _chat(url, "coder", PHRASES[0]).json()
    store = open_store(store_url_for(load_config(project), "coder"))
    before = len(store.feedback("coder"))
    poisoned = b'{"response_id": "%s", "rating": -1, "correction": "A01\\ud800"}' % answer["id"].encode()
    refused = post("/v1/feedback", poisoned)
    assert refused.status_code == 400 and "surrogate" in refused.json()["error"]["message"]
    assert post("/v1/feedback", poisoned.replace(b"\\ud800", b"\\u0000")).status_code == 400
    assert len(store.feedback("coder")) == before, "nothing refused was stored"
    assert "x-request-id" in refused.headers and process.poll() is None


def test_a_client_leaving_mid_stream_frees_its_slot_and_logs_no_error(server, project) -> None:
    url, process = server
    log = project.parent / "serve.log"
    before = len(log.read_bytes())
    body = {
        "model": "qa",
        "stream": True,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Describe the history of Rome in detail."}],
    }
    for _ in range(3):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first event; closing the response drops the connection
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health", timeout=10).json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{url}/health", timeout=10).json()["in_flight"] == 0, "the dropped streams kept their slots"
    time.sleep(1.0)
    written = log.read_bytes()[before:].decode("utf-8", "replace")
    assert "never retrieved" not in written and "Traceback" not in written and " ERROR " not in written, written
    assert _chat(url, "qa", "What is the capital of France?").status_code == 200 and process.poll() is None
