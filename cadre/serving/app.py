"""The HTTP API of `cadre serve` (FastAPI): OpenAI-compatible chat completions, model list, feedback, health.

Endpoints:

- `POST /v1/chat/completions`: `model` is a specialist's name or `auto`; the last user message is the
  program's input; `stream: true` answers with server-sent events in OpenAI's chunk format. The
  response carries the id feedback refers to (`chatcmpl-…`) and a `cadre` object (also as `x-cadre-*`
  headers) naming the specialist and the program / index / adapter versions that answered.
- `GET /v1/models`: the specialists (and `auto` when routing is on), with the versions serving.
- `POST /v1/feedback`: `{response_id, rating, correction?, comment?}` for a response this server sent.
- `GET /health`: liveness and what is loaded (no API key needed, for probes).

Every failure is an OpenAI-shaped JSON error with a 4xx (5xx only for the server's own faults) and the
server keeps serving: invalid JSON, text or fields 400 (see `cadre.serving.protocol`), wrong or missing
API key 401, unknown specialist or response id 404, body too large 413, no specialist close enough for
`auto` 422, too many requests in flight 429 with `Retry-After`, a specialist that cannot serve yet 503.
Every response carries an `x-request-id`; a failure of the server's own is a 500 that says only that
and the id, while the traceback goes to the server log under the same id.

Generation runs on worker threads (llama.cpp releases the GIL); the event loop only parses, admits and
streams. Each request takes the team's current snapshot and a lease on its adapter at admission and
holds them until its last token, so a champion swap never touches a request in flight.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cadre.config.project import ServingSettings
from cadre.feedback.store import (
    FeedbackStore,
    InvalidFeedback,
    ServedResponse,
    UnknownResponse,
)
from cadre.runtime.prompt import parse_completion
from cadre.serving.engine import GenerationCancelled, LoraEngine
from cadre.serving.protocol import (
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    FeedbackRequest,
    FeedbackStored,
    ModelList,
    TextTrimmer,
    chunk_body,
    completion_body,
    models_body,
    openapi_body,
    openapi_schemas,
    parse_body,
    program_inputs,
)
from cadre.serving.router import NoRoute, Router
from cadre.serving.team import (
    ChampionWatcher,
    Rendered,
    SpecialistRuntime,
    SpecialistUnavailable,
    Team,
    Unavailable,
)

AUTO = "auto"
REQUEST_ID_HEADER = "x-request-id"
SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event: `data` is a `chat.completion.chunk` (or an error object) as JSON, "
    "and `[DONE]` at the end",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}

log = logging.getLogger("cadre.serve")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in (*statuses, 500)}


@dataclass
class ServingState:
    """Everything the routes use: the team, the engine, the router, the feedback stores, limits and key."""

    team: Team
    engines: list[LoraEngine]
    stores: dict[str, FeedbackStore]
    limits: ServingSettings = field(default_factory=ServingSettings)  # the request limits of `project.serving`
    router: Router | None = None
    api_key: str | None = None
    descriptions: dict[str, str] = field(default_factory=dict)
    watcher: ChampionWatcher | None = None
    in_flight: int = 0
    mean_seconds: float = 1.0
    served: int = 0

    def distinct_stores(self) -> list[FeedbackStore]:
        return list({id(store): store for store in self.stores.values()}.values())


def create_app(state: ServingState, *, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI application over a serving state.

    Args:
        state: the team, engine, router, stores, limits and API key.
        on_shutdown: called once when the server stops (stop the watcher, free the engine).
    """
    executor = ThreadPoolExecutor(max_workers=state.limits.max_in_flight + 2, thread_name_prefix="cadre-serve")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if return_freed_memory_to_the_os():
            log.info("large freed blocks go back to the system at once (glibc mmap threshold fixed at 128 KiB)")
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(
        title="Cadre: the team of specialists", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.state.cadre = state
    app.add_middleware(_RequestIds)
    _document_request_bodies(app)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(
            ApiError(error.status_code, str(error.detail), code=code).body(),
            status_code=error.status_code,
            headers=error.headers,  # 405 names the allowed methods
        )

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def run(function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    @app.get("/health", responses=_errors())
    async def health() -> dict[str, Any]:
        watcher = state.watcher
        return {
            "status": "ok",
            "specialists": _team_status(state.team),
            "in_flight": state.in_flight,
            "served": state.served,
            "engines": [
                {
                    "model": engine.model_path.name,
                    "contexts": engine.contexts,
                    "adapters_loaded": len(engine.adapters_loaded()),
                }
                for engine in state.engines
            ],
            "watcher": {
                "last_poll": watcher.last_poll,
                "last_error": watcher.last_error,
                "interval_s": watcher.interval_s,
                "swaps": state.team.swaps,
            }
            if watcher
            else None,
        }

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **_errors(401)})
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        entries = []
        for name, status in _team_status(state.team).items():
            entries.append({"id": name, "cadre": {"description": state.descriptions.get(name, ""), **status}})
        if state.router is not None:
            entries.append(
                {
                    "id": AUTO,
                    "cadre": {
                        "description": "routes each request to the closest specialist",
                        "threshold": state.router.settings.threshold,
                        "margin": state.router.settings.margin,
                        "fallback": state.router.settings.fallback,
                    },
                }
            )
        return models_body(entries)

    @app.post(
        "/v1/feedback",
        status_code=201,
        response_model=None,
        openapi_extra=openapi_body(FeedbackRequest),
        responses={201: {"model": FeedbackStored}, **_errors(400, 401, 404, 413)},
    )
    async def feedback(request: Request) -> dict[str, Any]:
        check_key(request)
        body: FeedbackRequest = parse_body(FeedbackRequest, await _read_body(request, state.limits.max_body_bytes))
        return await run(_store_feedback, state, body)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        openapi_extra=openapi_body(ChatCompletionRequest),
        responses={
            200: {
                "model": ChatCompletion,
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
                "description": "The answer; with `stream: true`, server-sent events of `chat.completion.chunk`s",
            },
            **_errors(400, 401, 404, 413, 422, 429, 503),
        },
    )
    async def chat_completions(request: Request):
        check_key(request)
        body: ChatCompletionRequest = parse_body(
            ChatCompletionRequest, await _read_body(request, state.limits.max_body_bytes)
        )
        text = body.user_text()
        if len(text) > state.limits.max_input_chars:
            raise ApiError(
                400,
                f"the user message has {len(text)} characters; this server accepts at most {state.limits.max_input_chars}",
                param="messages",
                code="context_length_exceeded",
            )
        if state.in_flight >= state.limits.max_in_flight:
            wait = max(1, math.ceil(state.mean_seconds))
            raise ApiError(
                429,
                f"{state.in_flight} requests are in flight, the most this server admits; retry in {wait} s",
                type="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": str(wait)},
            )
        state.in_flight += 1
        admitted = time.perf_counter()
        handed_off = False
        try:
            routing = None
            name = body.model
            if name == AUTO:
                if state.router is None:
                    raise ApiError(
                        404,
                        "routing is off on this server: name a specialist as `model` (GET /v1/models lists them)",
                        param="model",
                        code="model_not_found",
                    )
                try:
                    routing = await run(state.router.route, text)
                except NoRoute as error:
                    raise ApiError(
                        422,
                        str(error),
                        param="model",
                        code="no_matching_specialist",
                        extra={
                            "scores": {k: round(v, 4) for k, v in error.scores.items()},
                            "threshold": error.threshold,
                            "margin": error.margin,
                            "off_topic": None if error.off_topic is None else round(error.off_topic, 4),
                        },
                    ) from None
                name = routing.specialist
            if name not in state.team.names:
                known = ", ".join(state.team.names + ([AUTO] if state.router else []))
                raise ApiError(
                    404,
                    f"no specialist named {body.model!r}; this server serves: {known}",
                    param="model",
                    code="model_not_found",
                )
            try:
                runtime, lease = state.team.checkout(name)
            except SpecialistUnavailable as error:
                raise ApiError(
                    503,
                    f"specialist {name!r} cannot answer yet: {error}",
                    type="server_error",
                    code="specialist_unavailable",
                    headers={"Retry-After": "30"},
                ) from None
            try:
                inputs = program_inputs(text, runtime.input_names)
                max_tokens = min(body.token_limit or runtime.max_tokens, state.limits.max_tokens)
                temperature = runtime.temperature if body.temperature is None else body.temperature
                rendered, prompt_tokens = await run(_prepare, state, runtime, inputs, max_tokens)
                call = _Call(
                    state=state,
                    runtime=runtime,
                    lease=lease,
                    inputs=inputs,
                    prompt=rendered.prompt,
                    prompt_tokens=prompt_tokens,
                    retrieved=rendered.retrieved_ids,
                    candidates=rendered.candidates,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    requested=body.model,
                    routing=routing,
                    admitted=admitted,
                    request_id=getattr(request.state, "request_id", ""),
                )
            except BaseException:
                lease.release()
                raise
            handed_off = True
            if body.stream:
                return _stream(call, run, executor)
            return await _complete(call, run)
        finally:
            if not handed_off:
                state.in_flight -= 1

    return app


# -------------------------------------------------------------------------------------- requests


class _RequestIds:
    """ASGI middleware: an id for every request (`x-request-id` on its response), and a generic 500 for our failures.

    A failure that is not an `ApiError` is the server's own: the client gets a 500 naming only the request
    id, never the exception; the traceback is logged with the id so an operator can find it.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if not started:
                response = JSONResponse(
                    internal_error(request_id).body(), status_code=500, headers={REQUEST_ID_HEADER: request_id}
                )
                await response(scope, receive, send)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 128 KiB, so large blocks are mapped on allocation and unmapped on free.

    Generating allocates and frees blocks of tens of MB in llama.cpp. glibc's default threshold rises to the
    size of a large block once one is freed, after which such blocks come from the heap, and the heap keeps
    what is freed in it: the server's RSS grew by ~0.5 MB per request without levelling off (150 generations
    in one process: +91 MB, all of it free memory that `malloc_trim` gave back; issue 19). With the threshold
    fixed, RSS swings by one such block and stays level.

    Returns:
        Whether it was set (False where the C library is not glibc; nothing changes there).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


def internal_error(request_id: str) -> ApiError:
    """What a client learns of a failure of ours: that it happened, and the id the server log has it under."""
    return ApiError(
        500,
        f"the server failed to answer this request; its log has the details under request id {request_id}",
        type="server_error",
        code="internal_error",
        extra={"request_id": request_id},
    )


def _document_request_bodies(app: FastAPI) -> None:
    """Put the request bodies' schemas into the OpenAPI document (the routes read and validate bodies themselves)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"the request body has {declared} bytes; this server accepts at most {limit}", code="request_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"the request body exceeds {limit} bytes, the most this server accepts", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(
    state: ServingState, runtime: SpecialistRuntime, inputs: dict[str, str], max_tokens: int
) -> tuple[Rendered, int]:
    """Retrieve, render and count the prompt; refuse it when it does not fit."""
    rendered = runtime.render(inputs)
    tokens = len(runtime.engine.tokenize(rendered.prompt))
    window = runtime.engine.n_ctx - max_tokens
    limit = min(window, state.limits.max_prompt_tokens) if state.limits.max_prompt_tokens else window
    if tokens > limit:
        raise ApiError(
            400,
            f"the prompt is {tokens} tokens (instruction, demos, retrieved passages and your input); this specialist "
            f"accepts at most {limit} with {max_tokens} tokens for the answer",
            param="messages",
            code="context_length_exceeded",
        )
    return rendered, tokens


@dataclass
class _Call:
    """One admitted request, ready to generate."""

    state: ServingState
    runtime: SpecialistRuntime
    lease: Any
    inputs: dict[str, str]
    prompt: str
    prompt_tokens: int
    retrieved: list[str]
    candidates: list[str]
    max_tokens: int
    temperature: float
    requested: str
    routing: Any
    admitted: float
    request_id: str = ""
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def cadre(self, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        found = {
            "specialist": self.runtime.name,
            "versions": self.runtime.versions.describe(),
            "retrieved_ids": self.retrieved,
        }
        if outputs is not None:
            found["outputs"] = outputs
        if self.routing is not None:
            found["routing"] = self.routing.to_dict()
        return found

    def headers(self) -> dict[str, str]:
        versions = self.runtime.versions.describe()
        found = {
            "x-cadre-response-id": self.id,
            "x-cadre-specialist": self.runtime.name,
            "x-cadre-program-version": versions["program"],
            "x-cadre-index-version": versions["index"],
            "x-cadre-adapter-version": versions["adapter"],
        }
        if self.routing is not None:
            found["x-cadre-route-score"] = f"{self.routing.score:.4f}"
        return found

    def generate(
        self, on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """Generate, record the response in the feedback store, and return what the client gets."""
        generation = self.runtime.generate(
            self.prompt,
            adapter=self.lease,
            candidates=self.candidates,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            on_text=on_text,
            cancelled=cancelled,
            prompt_tokens=self.prompt_tokens,
        )
        content = generation.text.strip()
        outputs = parse_completion(self.runtime.spec, generation.text)
        latency_ms = (time.perf_counter() - self.admitted) * 1000.0
        store = self.state.stores[self.runtime.name]
        store.record_response(
            ServedResponse(
                id=self.id,
                specialist=self.runtime.name,
                requested_model=self.requested,
                program_version=self.runtime.versions.program,
                index_version=self.runtime.versions.index,
                adapter_version=self.runtime.versions.adapter,
                inputs=self.inputs,
                prompt=self.prompt,
                completion=generation.text,
                answer=content,
                outputs=outputs,
                retrieved_ids=self.retrieved,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                latency_ms=latency_ms,
            )
        )
        usage = {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }
        return {
            "content": content,
            "outputs": outputs,
            "finish_reason": generation.finish_reason,
            "usage": usage,
            "seconds": generation.seconds,
        }

    def finish(self, loop: asyncio.AbstractEventLoop) -> None:
        """Release the adapter lease and the admission slot (from any thread)."""
        self.lease.release()
        seconds = time.perf_counter() - self.admitted

        def done() -> None:
            state = self.state
            state.in_flight -= 1
            state.served += 1
            state.mean_seconds = 0.8 * state.mean_seconds + 0.2 * seconds

        loop.call_soon_threadsafe(done)


async def _complete(call: _Call, run: Callable[..., Any]) -> JSONResponse:
    loop = asyncio.get_running_loop()

    def work() -> dict[str, Any]:
        try:
            return call.generate()
        finally:
            call.finish(loop)

    result = await run(work)
    body = completion_body(
        call.id,
        call.created,
        call.runtime.name,
        result["content"],
        result["finish_reason"],
        result["usage"],
        call.cadre(result["outputs"]),
    )
    return JSONResponse(body, headers=call.headers())


_END = object()


def _stream(call: _Call, run: Callable[..., Any], executor: ThreadPoolExecutor):
    """Stream the answer as server-sent events.

    Generation starts here, not when the response starts iterating: a client that goes away before the first
    event must still release its admission slot and adapter lease (the generation's `finally` does). When the
    client goes away, generation stops at the next token and its outcome is collected, not left unretrieved.
    """
    from sse_starlette.sse import EventSourceResponse

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    stop_flag = {"stop": False}
    trimmer = TextTrimmer()

    def on_text(piece: str) -> None:
        visible = trimmer.feed(piece)
        if visible:
            loop.call_soon_threadsafe(pieces.put_nowait, visible)

    def work() -> dict[str, Any]:
        try:
            return call.generate(on_text=on_text, cancelled=lambda: stop_flag["stop"])
        finally:
            call.finish(loop)
            loop.call_soon_threadsafe(pieces.put_nowait, _END)

    def collect(future: asyncio.Future) -> None:
        """Retrieve the generation's outcome whoever awaits it (nobody, once the client is gone); log a real failure."""
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, GenerationCancelled):
            log.error("request %s: generation failed", call.request_id, exc_info=error)

    started = loop.run_in_executor(executor, work)
    started.add_done_callback(collect)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            yield {
                "data": json.dumps(
                    chunk_body(call.id, call.created, call.runtime.name, {"role": "assistant", "content": ""})
                )
            }
            while (piece := await pieces.get()) is not _END:
                yield {"data": json.dumps(chunk_body(call.id, call.created, call.runtime.name, {"content": piece}))}
            try:
                result = await started
            except GenerationCancelled:
                return
            except Exception:  # noqa: BLE001 - the status line is sent and `collect` logs it; say so in the stream
                yield {"data": json.dumps(internal_error(call.request_id).body())}
                return
            final = chunk_body(
                call.id,
                call.created,
                call.runtime.name,
                {},
                result["finish_reason"],
                usage=result["usage"],
                cadre=call.cadre(result["outputs"]),
            )
            yield {"data": json.dumps(final)}
            yield {"data": "[DONE]"}
        finally:
            stop_flag["stop"] = (
                True  # if the client went away (cancelled, or the generator closed): stop at the next token
            )

    return EventSourceResponse(events(), headers=call.headers(), ping=15)


def _store_feedback(state: ServingState, body: FeedbackRequest) -> dict[str, Any]:
    for store in state.distinct_stores():
        served = store.get_response(body.response_id)
        if served is None:
            continue
        correction = body.correction
        if isinstance(correction, str):
            correction = {next(iter(served.outputs)): correction} if served.outputs else {}
        try:
            feedback_id = store.add_feedback(body.response_id, body.rating, correction, body.comment)
        except InvalidFeedback as error:
            raise ApiError(400, str(error), param="correction", code="invalid_feedback") from None
        except UnknownResponse:
            continue
        return {
            "object": "feedback",
            "id": feedback_id,
            "response_id": body.response_id,
            "specialist": served.specialist,
            "rating": body.rating,
            "correction": correction,
        }
    raise ApiError(
        404,
        f"no response with id {body.response_id!r} was served here (feedback must name the `id` of a chat "
        "completion this server sent)",
        param="response_id",
        code="response_not_found",
    )


def _team_status(team: Team) -> dict[str, dict[str, Any]]:
    status = {}
    for name in team.names:
        entry = team.entry(name)
        if isinstance(entry, Unavailable):
            status[name] = {"available": False, "reason": entry.reason}
        else:
            status[name] = {"available": True, "versions": entry.versions.describe(), "since": entry.built_at}
    return status
