"""`cadre serve` fuzzed from its own OpenAPI document (schemathesis): no 5xx, and every response as documented.

A live server is started for the module, the way a user starts it: a throwaway project with two
retrieval-free specialists (`qa`, `coder`) and routing on, its MLflow registry from `cadre up --only
mlflow`, `cadre serve` as a subprocess on the packaged 270M GGUF with answers capped at a few tokens.
Schemathesis generates requests for every operation of `/openapi.json`, valid ones and ones that break the
schema; half of them are pointed at something that exists (a served specialist, a response id this server
sent), so generation, routing and the feedback store are reached, not only the 404 paths.

Each response must pass schemathesis' checks: no server error, a documented status code, content type,
headers and body schema, and a 4xx for a request that breaks the schema. Bounded by example counts (and
`pytest-timeout`): about two minutes on two shared cores. The last test prints the figures (examples per
operation, statuses) and checks every operation was reached past validation.

Run: `python -m pytest -m fuzz tests/fuzz/test_server_schema.py -s`
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import httpx
import pytest
from support import free_port

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `test` extra")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = {"POST /v1/chat/completions": 120, "POST /v1/feedback": 120, "GET /v1/models": 15, "GET /health": 15}
SPECIALISTS = ["qa", "coder", "auto"]
START_TIMEOUT_S = 300

FIGURES: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """MLflow (`cadre up --only mlflow`) and `cadre serve` for a two-specialist project; yields its URL and an answer id."""
    from rich.console import Console

    from cadre.config import load_config
    from cadre.platform.env import OFFLINE_ENV
    from cadre.platform.stack import Stack

    root = tmp_path_factory.mktemp("fuzz-serve")
    (root / "suite").mkdir()
    (root / "suite" / "test.jsonl").write_text('{"id": "q1", "question": "What is 2+2?", "answer": "4"}\n')
    (root / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: fuzzserve
          state_dir: state
          mlflow: {{port: {free_port()}}}
          prefect: {{port: {free_port()}}}
          lm: {{port: {free_port()}, n_threads: 1}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: qa
            description: General knowledge questions about geography, such as the capital city of a country.
            examples: ["What is the capital of France?"]
            program:
              instruction: Answer the question with a short phrase.
              inputs: [{{name: question}}]
              outputs: [{{name: answer}}]
              retrieve_k: 0
              max_tokens: 4
            evaluation: {{suite: suite}}
          - name: coder
            description: Medical coding of a clinical phrase to its ICD-10-CM code.
            examples: ["Which ICD-10 code is typhoid endocarditis?"]
            program:
              instruction: Answer with the ICD-10-CM code of the phrase.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 0
              max_tokens: 4
            evaluation: {{suite: suite}}
        """)
    )
    config = load_config(root / "pipelines.yaml")
    stack = Stack(config)
    quiet = Console(stderr=True, quiet=True)
    stack.up(services=["mlflow"], console=quiet)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))} | OFFLINE_ENV
    env.pop("CADRE_API_KEY", None)
    log_path = root / "serve.log"
    command = [sys.executable, "-m", "cadre.cli", "serve", "-c", str(root / "pipelines.yaml"), "--port", str(port)]
    command += ["--threads", "1", "--max-tokens", "4", "--max-in-flight", "4", "--poll-interval", "60"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"cadre serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"cadre serve not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "qa", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        yield {"url": url, "response_id": answer.json()["id"], "process": process, "log": log_path}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        stack.down(console=quiet)


@pytest.fixture(scope="module")
def api(live_server: dict):
    # A body over the size limit is refused with 413 before it is read: for a schema-breaking one that is a refusal too.
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 422, 429]}}}
    )
    return schemathesis.openapi.from_url(f"{live_server['url']}/openapi.json", config=config)


def _operation(api, label: str):
    for result in api.get_all_operations():
        operation = result.ok()
        if operation.label == label:
            return operation
    raise AssertionError(f"{label} is not in the OpenAPI document")


def _aim(case, live_server: dict, aim: bool) -> None:
    """Point half the valid generated requests at something that exists, so they get past the 404s.

    Schema-breaking requests are sent as generated: aiming one could make it valid.
    """
    negative = case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE
    if not aim or negative or not isinstance(case.body, dict):
        return
    if case.operation.label == "POST /v1/feedback" and isinstance(case.body.get("response_id"), str):
        case.body["response_id"] = live_server["response_id"]
    elif case.operation.label == "POST /v1/chat/completions" and isinstance(case.body.get("model"), str):
        case.body["model"] = SPECIALISTS[len(case.body["model"]) % len(SPECIALISTS)]
        messages = case.body.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            # the generated text stays (that is what is fuzzed); it is made the user's, and never blank
            content = messages[-1].get("content")
            text = content if isinstance(content, str) and content.strip() else "What is the capital of France?"
            messages[-1] = {**messages[-1], "role": "user", "content": text}


@pytest.mark.parametrize("label", list(EXAMPLES))
def test_every_generated_request_gets_a_documented_answer_and_never_a_5xx(api, live_server: dict, label: str) -> None:
    operation = _operation(api, label)
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(
        max_examples=EXAMPLES[label],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=cases, aim=st.booleans())
    def fuzz(case, aim: bool) -> None:
        _aim(case, live_server, aim)
        figures = FIGURES[label]
        figures["examples"] += 1
        figures["negative" if case.meta and case.meta.generation.mode == GenerationMode.NEGATIVE else "positive"] += 1
        response = case.call(base_url=live_server["url"], timeout=120)
        figures[f"status {response.status_code}"] += 1
        if response.status_code >= 400 and "json" in response.headers.get("content-type", [""])[0]:
            FIGURES[f"{label} refusals"][str(response.json()["error"]["code"])] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception:
            figures["failures"] += 1
            raise

    fuzz()
    assert live_server["process"].poll() is None, "the server is still up"


def test_fuzz_figures_every_operation_was_reached_past_validation(live_server: dict) -> None:
    """Prints what the fuzzing did; fails if an operation never got a success (the fuzzing then proved little)."""
    lines = ["", "cadre serve fuzzed from its OpenAPI document:"]
    for label, figures in FIGURES.items():
        if label.endswith(" refusals"):
            lines.append(f"    refused as: {dict(figures.most_common())}")
            continue
        statuses = ", ".join(f"{k.removeprefix('status ')}: {v}" for k, v in sorted(figures.items()) if "status" in k)
        lines.append(
            f"  {label}: {figures['examples']} examples ({figures['positive']} valid, {figures['negative']} "
            f"schema-breaking), failures {figures['failures']}; statuses {statuses}"
        )
    operations = [label for label in FIGURES if not label.endswith(" refusals")]
    lines.append(
        f"  total {sum(FIGURES[label]['examples'] for label in operations)} examples over {len(operations)} operations"
    )
    print("\n".join(lines))
    assert set(operations) == set(EXAMPLES)
    assert FIGURES["POST /v1/chat/completions"]["status 200"] > 0, "no generated chat request was answered"
    assert FIGURES["POST /v1/feedback"]["status 201"] > 0, "no generated feedback was stored"
    assert not any(key.startswith("status 5") for figures in FIGURES.values() for key in figures)
    log = live_server["log"].read_text(errors="replace")
    assert "Future exception was never retrieved" not in log
