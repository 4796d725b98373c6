"""Request validation of `cadre serve`: every bad request gets a 4xx with an OpenAI-shaped error, and the API keeps answering.

These run the real FastAPI app over a team whose specialist has not loaded (no model is needed to
refuse a request); generation itself is covered by tests/integration/test_serve.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cadre.feedback.store import FeedbackStore, ServedResponse, default_store_url
from cadre.serving.app import ServingState, create_app
from cadre.serving.protocol import ApiError, TextTrimmer, program_inputs
from cadre.serving.server import ServeLimits
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
        limits=ServeLimits(max_body_bytes=2048, max_input_chars=100, max_in_flight=2),
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
        client.post("/v1/chat/completions", content=json.dumps(_chat(content="x" * 3000)).encode()),
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
