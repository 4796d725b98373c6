"""The OpenAI-compatible wire format of `cadre serve`: requests, responses, stream chunks and errors.

Only what Cadre needs is validated; other OpenAI parameters a client sends (`top_p`, `user`, …) are
accepted and ignored, so stock OpenAI clients work unchanged. Errors use OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """An error the API answers with a status and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **self.extra}
        }


# ------------------------------------------------------------------------------------- requests


class ContentPart(BaseModel):
    """One part of a message's content (only text parts carry anything Cadre can use)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`: `model` names a specialist (or `auto`); the last user message is the program's input."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")

    def user_text(self) -> str:
        """The content of the last user message.

        Raises:
            ApiError: no user message.
        """
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise ApiError(
            400, "messages hold no user message; the last user message is what the specialist answers", param="messages"
        )

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a rating, and optionally a correction, for a response this server sent."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=64)
    rating: int = Field(description="-1 (bad), 0 (neutral) or 1 (good).")
    correction: str | dict[str, str] | None = Field(
        None, description="The right answer: text for the first output field, or an object of output fields."
    )
    comment: str | None = Field(None, max_length=4000)

    @field_validator("rating")
    @classmethod
    def _rating(cls, value: int) -> int:
        if value not in (-1, 0, 1):
            raise ValueError("rating must be -1 (bad), 0 (neutral) or 1 (good)")
        return value


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse a JSON body into `model`, turning every problem into a 400 that names it.

    Raises:
        ApiError: the body is not JSON, not an object, or does not validate.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
        raise ApiError(
            400, f"{where}: {message}{more}" if where else message + more, param=where, code="invalid_request"
        ) from None


def program_inputs(text: str, input_names: Sequence[str]) -> dict[str, str]:
    """The program's inputs from a user message.

    A JSON object whose keys are input names is taken field by field (required when the program has several
    inputs); any other text is the value of the first input.

    Raises:
        ApiError: a multi-input program got a JSON object with unknown or missing fields.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and (len(input_names) > 1 or set(value) <= set(input_names)):
            unknown = sorted(set(value) - set(input_names))
            missing = [name for name in input_names if not str(value.get(name, "")).strip()]
            if unknown or missing:
                problems = ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []) + (
                    [f"missing field(s) {', '.join(missing)}"] if missing else []
                )
                raise ApiError(
                    400,
                    f"the message's JSON object does not match the specialist's inputs ({', '.join(input_names)}): "
                    + "; ".join(problems),
                    param="messages",
                    code="invalid_inputs",
                )
            return {name: str(value[name]) for name in input_names}
    if len(input_names) > 1:
        raise ApiError(
            400,
            f"this specialist takes several inputs ({', '.join(input_names)}); send them as a JSON object in the "
            "user message, e.g. " + json.dumps({name: "…" for name in input_names}),
            param="messages",
            code="invalid_inputs",
        )
    if not stripped:
        raise ApiError(400, "the user message is empty", param="messages", code="invalid_inputs")
    return {input_names[0]: stripped}


# ------------------------------------------------------------------------------------ responses


def completion_body(
    response_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage: Mapping[str, int],
    cadre: Mapping[str, Any],
) -> dict[str, Any]:
    """A `chat.completion` object (with Cadre's `cadre` object: who answered, with which versions)."""
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": dict(usage),
        "cadre": dict(cadre),
    }


def chunk_body(
    response_id: str, created: int, model: str, delta: Mapping[str, Any], finish_reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A `chat.completion.chunk` object of a stream."""
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish_reason}],
        **extra,
    }


def models_body(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"object": "model", "created": created, "owned_by": "cadre", **entry} for entry in entries],
    }


class TextTrimmer:
    """Streams text with leading and trailing whitespace removed, so the pieces add up to `text.strip()`.

    Whitespace after the last visible character is held back until more visible text follows; at the end it is dropped.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        visible = text.rstrip()
        self._held = text[len(visible) :]
        return visible
