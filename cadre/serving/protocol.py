"""The OpenAI-compatible wire format of `cadre serve`: requests, responses, stream chunks and errors.

Only what Cadre needs is validated; other OpenAI parameters a client sends (`top_p`, `user`, …) are
accepted and ignored, so stock OpenAI clients work unchanged. Errors use OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}

Every text enters here (`parse_body`): a body that is not UTF-8, not JSON (`NaN` and numbers of thousands of
digits included), nested deeper than `MAX_JSON_DEPTH`, or holding a string with a lone UTF-16 surrogate or a
NUL is refused with a 400 that names where, before anything downstream (tokenizers, the router, the
feedback store, its exports) sees it. Corrections and comments also refuse other control characters and
are capped at `MAX_FEEDBACK_CHARS`; numbers and flags are strict (`"rating": true` is not a rating).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a request body may have (OpenAI's requests need 5)."""

MAX_FEEDBACK_CHARS = 4000
"""Longest correction (each field) and comment."""

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is alone
_NUL = re.compile("\x00")
_CONTROL_CLASS = "\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f"  # all but tab, newline, carriage return
_CONTROL = re.compile(f"[{_CONTROL_CLASS}]")
_PRINTABLE = {"pattern": f"^[^{_CONTROL_CLASS}]*$"}
# The feedback rules in the OpenAPI document, so a client (and a fuzzer) can see them; the validators below enforce
# them with messages that name the character or the length.
FeedbackText = Annotated[str, Field(json_schema_extra=_PRINTABLE | {"maxLength": MAX_FEEDBACK_CHARS})]
FeedbackFields = Annotated[dict[str, FeedbackText], Field(json_schema_extra={"propertyNames": _PRINTABLE})]


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

    model: str = Field(min_length=1, max_length=128, description="A specialist's name, or `auto` to route.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = Field(False, strict=True, description="Answer with server-sent events (OpenAI's chunks).")
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="Only one choice per request.")

    def user_text(self) -> str:
        """The content of the last user message.

        Raises:
            ApiError: no user message.
        """
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise ApiError(
            400,
            "messages hold no user message; the last user message is what the specialist answers",
            param="messages",
            code="invalid_inputs",
        )

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a rating, and optionally a correction, for a response this server sent."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=64)
    rating: int = Field(strict=True, ge=-1, le=1, description="-1 (bad), 0 (neutral) or 1 (good).")
    correction: FeedbackText | FeedbackFields | None = Field(
        None,
        description="The right answer: text for the first output field, or an object of output fields "
        f"(at most {MAX_FEEDBACK_CHARS} characters each, no control characters but tab and newline).",
    )
    comment: FeedbackText | None = Field(None, max_length=MAX_FEEDBACK_CHARS)

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON Schema's integer: `1.0` is one
        if isinstance(value, int) and not isinstance(value, bool) and value not in (-1, 0, 1):
            raise ValueError("rating must be -1 (bad), 0 (neutral) or 1 (good)")
        return value

    @field_validator("correction")
    @classmethod
    def _correction(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        fields = value if isinstance(value, dict) else {"": value} if value is not None else {}
        for name, text in fields.items():
            where = f"field {name!r}" if name else "the correction"
            if len(text) > MAX_FEEDBACK_CHARS:
                raise ValueError(f"{where} has {len(text)} characters; at most {MAX_FEEDBACK_CHARS} are accepted")
            _refuse_control("a field name", name)
            _refuse_control(where, text)
        return value

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str | None) -> str | None:
        if value is not None:
            _refuse_control("the comment", value)
        return value


def _refuse_control(where: str, text: str) -> None:
    found = _CONTROL.search(text)
    if found:
        raise ValueError(
            f"{where} holds the control character U+{ord(found.group()):04X} at position {found.start()}; "
            "only printable text, tabs and newlines are accepted"
        )


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse a JSON body into `model`, turning every problem into a 400 that names it.

    Raises:
        ApiError: the body is not UTF-8, not JSON, not an object, too deeply nested, holds text no encoder can
            write (a lone surrogate, a NUL), or does not validate.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400, f"the request body is not UTF-8: byte {error.start} is {raw[error.start]:#04x}", code="invalid_json"
        ) from None
    data = loads_json(text, "the request body")
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    check_json_text(data)
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


def loads_json(text: str, what: str) -> Any:
    """`json.loads` that refuses what Python accepts but JSON does not (`NaN`, `Infinity`) and answers every failure
    (nesting past the interpreter's recursion limit, integers of thousands of digits included) with a 400.

    Raises:
        ApiError: `text` is not JSON this server accepts.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(
            400, f"{what} is nested deeper than the {MAX_JSON_DEPTH} levels accepted", code="invalid_json"
        ) from None
    except ValueError as error:  # JSONDecodeError, a refused constant, an integer past Python's digit limit
        raise ApiError(400, f"{what} is not valid JSON: {error}", code="invalid_json") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_json_text(data: Any, what: str = "") -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH`, or with a string (key or value) holding a lone surrogate or NUL.

    Walks the value without recursion, so no depth can overflow the stack.

    Raises:
        ApiError: 400 naming the first offending path.
    """
    pending: list[tuple[Any, str, int]] = [(data, what, 0)]
    while pending:
        value, path, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ApiError(
                400,
                f"{path or 'the request body'} is nested deeper than the {MAX_JSON_DEPTH} levels accepted",
                param=path or None,
                code="invalid_json",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                _check_text(key, f"{path or 'the request body'} (a key)")
                pending.append((item, where, depth + 1))
        else:
            pending.extend(
                (item, f"{path}.{index}" if path else str(index), depth + 1) for index, item in enumerate(value)
            )


def _check_text(text: str, path: str) -> None:
    for pattern, what in ((_LONE_SURROGATE, "a lone UTF-16 surrogate"), (_NUL, "a NUL character")):
        found = pattern.search(text)
        if found:
            raise ApiError(
                400,
                f"{path or 'the request body'} holds {what} (U+{ord(found.group()):04X} at position {found.start()}), "
                "which is not text; send valid Unicode",
                param=path or None,
                code="invalid_text",
            )


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
            value = loads_json(stripped, "the message's JSON object")
        except ApiError:
            value = None  # not JSON this server reads: it is just text
        if isinstance(value, dict):
            check_json_text(value, "messages")
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


# ------------------------------------------------------------------------ documented responses


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every failure: OpenAI's error object (extra keys such as `request_id` or routing `scores` may follow)."""

    error: ErrorDetail


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A `chat.completion`; `cadre` names the specialist and the versions that answered (and the parsed outputs)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    cadre: dict[str, Any]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    cadre: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class FeedbackStored(BaseModel):
    object: Literal["feedback"]
    id: int
    response_id: str
    specialist: str
    rating: int
    correction: dict[str, str] | None


def openapi_schemas() -> dict[str, Any]:
    """JSON Schemas of the request bodies, for the OpenAPI document's components (routes read bodies themselves)."""
    from pydantic.json_schema import models_json_schema

    _, found = models_json_schema(
        [(ChatCompletionRequest, "validation"), (FeedbackRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    return found["$defs"]


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }
