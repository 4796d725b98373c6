"""Request validation of `cadre serve`: every bad request gets a 4xx with an OpenAI-shaped error, and the API keeps answering.

These run the real FastAPI app over a team whose specialist has not loaded (no model is needed to
refuse a request); generation itself is covered by tests/integration/test_serve.py.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cadre.config.project import ServingSettings
from cadre.feedback.store import FeedbackStore, ServedResponse, default_store_url
from cadre.serving.app import ServingState, create_app
from cadre.serving.protocol import ApiError, TextTrimmer, program_inputs
from cadre.serving.team import Team

KEY = "s3cret"


@pytest.fixture()
def client(tmp_path: Path):
    store = FeedbackStore(default_store_url(tmp_path))
    store.record_response(
        ServedResponse(
            id="chatcmpl-known",
            specialist="coder",
            requested_model="coder",
            program_version=None,
            index_version=None,
            adapter_version=None,
            inputs={"phrase": "gout"},
            prompt="p",
            completion=" M10",
            answer="M10",
            outputs={"code": "M10"},
        )
    )
    state = ServingState(
        team=Team(["coder"]),
        engines=[],
        stores={"coder": store},
        api_key=KEY,
        limits=ServingSettings(max_body_bytes=8192, max_input_chars=100, max_in_flight=2),
    )
    with TestClient(create_app(state), headers={"Authorization": f"Bearer {KEY}"}) as test_client:
        yield test_client


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _chat(model: str = "coder", content: str = "gout", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def test_api_key_is_required_when_configured(client: TestClient) -> None:
    _error(
        client.post("/v1/chat/completions", json=_chat(), headers={"Authorization": "Bearer wrong"}),
        401,
        "invalid_api_key",
    )
    _error(client.get("/v1/models", headers={"Authorization": ""}), 401, "invalid_api_key")
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200, "probes need no key"


def test_malformed_requests_are_400_with_the_problem_named(client: TestClient) -> None:
    _error(
        client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    _error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json")
    missing = _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)
    assert missing["param"] == "model"
    _error(client.post("/v1/chat/completions", json={"model": "coder", "messages": []}), 400)
    _error(client.post("/v1/chat/completions", json=_chat(n=2)), 400)
    assistant_only = {"model": "coder", "messages": [{"role": "assistant", "content": "hi"}]}
    assert "no user message" in _error(client.post("/v1/chat/completions", json=assistant_only), 400)["message"]
    too_long = _error(
        client.post("/v1/chat/completions", json=_chat(content="x" * 101)), 400, "context_length_exceeded"
    )
    assert "100" in too_long["message"]


def test_unknown_specialist_oversize_body_and_unavailable_specialist(client: TestClient) -> None:
    unknown = _error(client.post("/v1/chat/completions", json=_chat(model="nobody")), 404, "model_not_found")
    assert "coder" in unknown["message"]
    _error(client.post("/v1/chat/completions", json=_chat(model="auto")), 404, "model_not_found")  # routing is off here
    _error(
        client.post("/v1/chat/completions", content=json.dumps(_chat(content="x" * 9000)).encode()),
        413,
        "request_too_large",
    )
    unavailable = client.post("/v1/chat/completions", json=_chat())
    _error(unavailable, 503, "specialist_unavailable")
    assert unavailable.headers["retry-after"]


def test_feedback_validation(client: TestClient) -> None:
    stored = client.post("/v1/feedback", json={"response_id": "chatcmpl-known", "rating": -1, "correction": "M10.9"})
    assert stored.status_code == 201, stored.text
    assert stored.json()["correction"] == {"code": "M10.9"}
    _error(
        client.post("/v1/feedback", json={"response_id": "chatcmpl-unknown", "rating": -1}), 404, "response_not_found"
    )
    _error(client.post("/v1/feedback", json={"response_id": "chatcmpl-known", "rating": 3}), 400)
    _error(
        client.post("/v1/feedback", json={"response_id": "chatcmpl-known", "rating": -1, "correction": {"why": "x"}}),
        400,
        "invalid_feedback",
    )
    _error(client.post("/v1/feedback", json={"response_id": "chatcmpl-known", "rating": 1, "surprise": True}), 400)


def test_models_lists_the_team_and_unknown_paths_are_openai_shaped(client: TestClient) -> None:
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["cadre"]["available"]) for m in listed["data"]] == [("coder", False)]
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/chat/completions"), 405)


def test_program_inputs_maps_text_or_a_json_object() -> None:
    assert program_inputs(" typhoid endocarditis ", ["phrase"]) == {"phrase": "typhoid endocarditis"}
    assert program_inputs('{"phrase": "gout"}', ["phrase"]) == {"phrase": "gout"}
    assert program_inputs('{"not": "an input"}', ["phrase"]) == {"phrase": '{"not": "an input"}'}, (
        "other JSON is just text"
    )
    assert program_inputs('{"question": "q", "table": "t"}', ["question", "table"]) == {"question": "q", "table": "t"}
    with pytest.raises(ApiError, match="missing field"):
        program_inputs('{"question": "q"}', ["question", "table"])
    with pytest.raises(ApiError, match="unknown field"):
        program_inputs('{"question": "q", "table": "t", "x": 1}', ["question", "table"])
    with pytest.raises(ApiError, match="JSON object"):
        program_inputs("plain text", ["question", "table"])
    with pytest.raises(ApiError, match="empty"):
        program_inputs("   ", ["phrase"])


def test_streamed_pieces_add_up_to_the_stripped_answer() -> None:
    for pieces in ([" A01", ".02", "  "], ["  ", "\n", " K35", " ", ".2", "0 \n"], ["", "x"], [" "]):
        trimmer = TextTrimmer()
        assert "".join(trimmer.feed(p) for p in pieces) == "".join(pieces).strip()


# ------------------------------------------------------------------ hostile input (issue 19)


def _raw(client: TestClient, path: str, body: bytes):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_text_no_encoder_can_write_is_refused_before_anything_reads_it(client: TestClient) -> None:
    """A lone surrogate reached the tokenizer (`TextEncodeInput must be …`) and deep JSON the parser's recursion: 500s."""
    surrogate = _error(
        _raw(
            client, "/v1/chat/completions", b'{"model": "coder", "messages": [{"role": "user", "content": "\\ud800"}]}'
        ),
        400,
        "invalid_text",
    )
    assert surrogate["param"] == "messages.0.content" and "surrogate" in surrogate["message"]
    in_a_part = b'{"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}'
    _error(_raw(client, "/v1/chat/completions", in_a_part), 400, "invalid_text")
    _error(_raw(client, "/v1/chat/completions", b'{"model": "coder\\u0000", "messages": []}'), 400, "invalid_text")
    nested = b'{"model": "coder", "messages": ' + b"[" * 25_000 + b"]" * 25_000 + b"}"  # 50 KB
    state = ServingState(team=Team(["coder"]), engines=[], stores={})  # the default 64 KB body limit
    with TestClient(create_app(state)) as roomy:
        assert "nested deeper" in _error(_raw(roomy, "/v1/chat/completions", nested), 400, "invalid_json")["message"]
        huge_number = b'{"model": "coder", "n": 1' + b"0" * 5000 + b"}"  # past Python's digit limit: ValueError
        _error(_raw(roomy, "/v1/chat/completions", huge_number), 400, "invalid_json")
    shallow_but_deep = b'{"model": "coder", "extra": ' + b"[" * 40 + b"]" * 40 + b"}"
    _error(_raw(client, "/v1/chat/completions", shallow_but_deep), 400, "invalid_json")
    _error(_raw(client, "/v1/chat/completions", b'{"model": "coder", "temperature": NaN}'), 400, "invalid_json")
    assert "not UTF-8" in _error(_raw(client, "/v1/chat/completions", b'{"model": "\xff"}'), 400)["message"]
    assert client.get("/v1/models").status_code == 200, "the server keeps answering"


def test_strict_fields_refuse_what_only_looks_like_a_value(client: TestClient) -> None:
    for field, value in (("stream", "true"), ("max_tokens", True), ("max_tokens", 1.5), ("n", True)):
        _error(client.post("/v1/chat/completions", json=_chat(**{field: value})), 400, "invalid_request")
    _error(client.post("/v1/chat/completions", json=_chat(model="m" * 129)), 400, "invalid_request")


def test_a_user_message_holding_deep_json_is_a_400_not_a_recursion_error() -> None:
    deep = '{"phrase": ' + "[" * 3000 + "]" * 3000 + "}"
    assert program_inputs(deep, ["phrase"]) == {"phrase": deep}, "JSON this server cannot read is just text"
    with pytest.raises(ApiError, match="nested deeper"):
        program_inputs('{"question": ' + "[" * 40 + "]" * 40 + ', "table": "t"}', ["question", "table"])
    with pytest.raises(ApiError, match="surrogate"):
        program_inputs('{"phrase": "\\ud800"}', ["phrase"])


def test_a_poisoned_correction_is_refused_and_stores_nothing(client: TestClient, tmp_path: Path) -> None:
    """Issue 19: `"\\ud800"` in a correction got a 500 *and* a stored row that then broke every export."""
    store = FeedbackStore(default_store_url(tmp_path))
    refused = {
        "surrogate": b'{"response_id": "chatcmpl-known", "rating": -1, "correction": "A\\ud800"}',
        "surrogate in an object": b'{"response_id": "chatcmpl-known", "rating": -1, "correction": {"code": "\\udfff"}}',
        "NUL": b'{"response_id": "chatcmpl-known", "rating": -1, "correction": "M10\\u0000"}',
        "control character": b'{"response_id": "chatcmpl-known", "rating": -1, "correction": "M10\\u001b[31m"}',
        "control in a comment": b'{"response_id": "chatcmpl-known", "rating": 0, "comment": "bell\\u0007"}',
        "too long": json.dumps({"response_id": "chatcmpl-known", "rating": -1, "correction": "x" * 4001}).encode(),
        "too long field": json.dumps(
            {"response_id": "chatcmpl-known", "rating": -1, "correction": {"code": "x" * 5000}}
        ).encode(),
        "bool rating": b'{"response_id": "chatcmpl-known", "rating": true}',
        "fractional rating": b'{"response_id": "chatcmpl-known", "rating": 0.5}',
        "string rating": b'{"response_id": "chatcmpl-known", "rating": "1"}',
    }
    for what, body in refused.items():
        response = _raw(client, "/v1/feedback", body)
        assert response.status_code == 400, (what, response.text)
    assert store.feedback() == [], "nothing refused was stored"
    kept = client.post(
        "/v1/feedback",
        json={"response_id": "chatcmpl-known", "rating": -1, "correction": "M10.9\tgout,\nunspecified", "comment": "ü"},
    )
    assert kept.status_code == 201, kept.text
    stored = store.feedback()
    assert [record.correction for record in stored] == [{"code": "M10.9\tgout,\nunspecified"}]
    exported = io.StringIO()
    assert store.export_jsonl(exported).written == 1 and json.loads(exported.getvalue())["comment"] == "ü"
    # JSON Schema's integer, which the OpenAPI document declares: `1.0` is one
    assert _raw(client, "/v1/feedback", b'{"response_id": "chatcmpl-known", "rating": 1.0}').status_code == 201
    assert [record.rating for record in store.feedback()][-1:] == [1]


def test_our_own_failure_is_a_generic_500_whose_details_are_logged_under_its_request_id(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FeedbackStore(default_store_url(tmp_path))
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE cadre_feedback")  # the database breaks under the server
    with caplog.at_level(logging.ERROR, logger="cadre.serve"):
        response = client.post("/v1/feedback", json={"response_id": "chatcmpl-known", "rating": 1})
    error = _error(response, 500, "internal_error")
    request_id = response.headers["x-request-id"]
    assert error["request_id"] == request_id and request_id in error["message"]
    assert "sqlite" not in response.text.lower() and "OperationalError" not in response.text, "no internals leak"
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert logged and logged[0].exc_info and "no such table" in str(logged[0].exc_info[1])
    assert client.get("/v1/models").status_code == 200, "the server keeps answering"


def test_every_response_has_a_request_id_and_405_names_the_allowed_methods(client: TestClient) -> None:
    ids = {client.get(path).headers["x-request-id"] for path in ("/health", "/v1/models", "/v1/nothing")}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    not_allowed = client.put("/v1/feedback")
    _error(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["allow"] == "POST"


def test_the_openapi_document_describes_the_bodies_the_routes_read(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/feedback", "FeedbackRequest")):
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and model in schemas
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert schemas["FeedbackRequest"]["properties"]["rating"] == {
        "description": "-1 (bad), 0 (neutral) or 1 (good).",
        "maximum": 1,
        "minimum": -1,
        "title": "Rating",
        "type": "integer",
    }
    streamed = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert streamed["schema"]["required"] == ["data"], "each event is described (the fuzz tier found it was not)"


HEAP_PROBE = r"""
import ctypes, ctypes.util, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "server":
    from cadre.serving.app import return_freed_memory_to_the_os
    assert return_freed_memory_to_the_os()
def anonymous_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024
SIZE = 16 << 20
libc.free(libc.malloc(SIZE))  # glibc raises its mmap threshold once a large mapped block is freed
before = anonymous_mb()
block = libc.malloc(SIZE)
libc.memset(block, 1, SIZE)
guard = libc.malloc(4096)  # keeps the block off the heap's top, where freeing it could trim it
libc.free(block)
print(anonymous_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_server_hands_large_freed_blocks_back_at_once() -> None:
    """Issue 19: RSS grew ~0.5 MB per request because glibc kept llama.cpp's freed blocks of tens of MB in its heap."""

    def kept_mb(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        return float(done.stdout.strip())

    assert kept_mb("default") >= 15, "the probe shows what glibc does by default: the freed 16 MB stay resident"
    assert kept_mb("server") < 1, "with the server's setting the freed block goes back to the system"
