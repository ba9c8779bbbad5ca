"""Routes of the OpenAI-compatible HTTP API, on the router's dispatcher.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as
server-sent events, or whole), ``GET /v1/models[/{model}]``, and ``GET /health``
(ready) and ``GET /health/live``. A generation request goes the gRPC path's way:
API key → tenant (``router/security.py``), body → protobuf request
(``convert``), then ``router/intake.py`` (validation, admission, limits, job,
dispatcher). A client that disconnects cancels its handler, which aborts the
request (aiohttp's handler cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import DEADLINE_EXCEEDED, NOT_FOUND, RequestError, invalid
from router import errors as grpc_errors
from router import http_observer, intake
from router.dispatcher import Dispatcher
from router.openai import chunks, convert, errors
from router.openai import protocol as p
from router.openai.folded import Folded
from router.security import Authenticator

logger = logging.getLogger(__name__)

TIMEOUT_HEADER: Final = "X-Request-Timeout"
"""Seconds the client waits for the whole request: the call's deadline, as gRPC's."""
SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
Stream = intake.EventStream
Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Endpoint:
    """What differs between the two generation routes."""

    route: str
    body: type[p.ChatCompletionRequest] | type[p.CompletionRequest]
    kind: str
    """``chat.completion`` or ``text_completion``."""


CHAT: Final = Endpoint("/v1/chat/completions", p.ChatCompletionRequest, "chat.completion")
COMPLETIONS: Final = Endpoint("/v1/completions", p.CompletionRequest, "text_completion")


def json_response(
    value: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response with ``value`` (compact, UTF-8)."""
    return web.Response(
        body=chunks.dumps(value), status=status, headers=headers, content_type="application/json"
    )


def error_response(
    exc: RequestError, rename: Callable[[str], str] = lambda field: field
) -> web.Response:
    """OpenAI's error body and status for ``exc``."""
    errors.log(exc)
    status = errors.http_status(exc.code)
    return json_response(errors.body(exc, rename), status, errors.headers(exc))


def deadline_s(headers: Mapping[str, str]) -> float | None:
    """Seconds left from the ``X-Request-Timeout`` header; None without one."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise invalid(TIMEOUT_HEADER, "must be a positive number of seconds")
    return seconds


class Door(Protocol):
    """Where the routes send requests: the router's own intake (:class:`RouterDoor`).

    ``bench/http_beside.py`` plugs in another (a gRPC client of a router) to measure
    the HTTP API run beside the router instead of in it.
    """

    def authenticate(self, headers: Headers) -> str:
        """The caller's tenant; RequestError(UNAUTHENTICATED) without a valid key."""

    async def open(
        self, request: intake.Request, tenant: str, headers: Headers, timeout: float | None
    ) -> Stream:
        """Queue the request; its events (see ``intake.open_stream``). The caller closes
        the stream."""

    async def model(self) -> pb.ModelInfo:
        """The served model."""

    def ready(self) -> bool:
        """Whether requests can be taken now."""


class RouterDoor:
    """This router's dispatcher and keys: the gRPC servicer's path exactly."""

    def __init__(self, dispatcher: Dispatcher, auth: Authenticator) -> None:
        self.dispatcher = dispatcher
        self.auth = auth

    def authenticate(self, headers: Headers) -> str:
        """The tenant of the ``Authorization: Bearer`` key (``router/security.py``)."""
        return self.auth.tenant(headers)

    async def open(
        self, request: intake.Request, tenant: str, headers: Headers, timeout: float | None
    ) -> Stream:
        """Validation, admission, limits, job and dispatcher, as for gRPC."""
        return await intake.open_stream(
            self.dispatcher, request, tenant=tenant, time_remaining_s=timeout, metadata=headers
        )

    async def model(self) -> pb.ModelInfo:
        """As the workers' heartbeats report it."""
        return intake.served_model(self.dispatcher)

    def ready(self) -> bool:
        """Redis reachable, a worker live, not draining."""
        return self.dispatcher.view.ready


class OpenAIRoutes:
    """The handlers, bound to a door."""

    def __init__(self, door: Door, auth_health: bool = False) -> None:
        self.door = door
        self.auth_health = auth_health

    def add_to(self, app: web.Application) -> None:
        """Register every route on ``app``."""
        app.router.add_post(CHAT.route, self.chat)
        app.router.add_post(COMPLETIONS.route, self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.ready)
        app.router.add_get("/health/live", self.live)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._generate(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        return await self._generate(request, COMPLETIONS)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: the served model."""
        return await self._describe(request, "")

    async def model(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{model}``."""
        return await self._describe(request, request.match_info["model"])

    async def _describe(self, request: web.Request, name: str) -> web.StreamResponse:
        route = "/v1/models/{model}" if name else "/v1/models"
        with http_observer.http_call("GET", route, request.headers) as call:
            try:
                self.door.authenticate(_headers(request))
                info = await self.door.model()
                if name and name not in (info.served_model_name, info.model_path):
                    raise RequestError(NOT_FOUND, "model", f"{name!r} is not served here")
            except RequestError as exc:
                call.fail(exc.code, exc.message)
                return error_response(exc)
            card = _model_card(info)
            return json_response(card if name else {"object": "list", "data": [card]})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """``GET /health``: 200 when requests can be taken, else 503."""
        if self.auth_health:
            try:
                self.door.authenticate(_headers(request))
            except RequestError as exc:
                return error_response(exc)
        ready = self.door.ready()
        status = "SERVING" if ready else "NOT_SERVING"
        return json_response({"status": status}, 200 if ready else 503)

    async def live(self, request: web.Request) -> web.StreamResponse:
        """``GET /health/live``: 200 while the process runs."""
        return json_response({"status": "SERVING"})

    # ------------------------------------------------------------------ generation

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """Authenticate, convert, open the door, then stream or fold the events."""
        with http_observer.http_call("POST", endpoint.route, request.headers) as call:
            rename: Callable[[str], str] = lambda field: field  # noqa: E731
            try:
                headers = _headers(request)
                tenant = self.door.authenticate(headers)
                timeout = deadline_s(request.headers)
                body = p.parse(endpoint.body, await request.read())
                client_id = request.headers.get(convert.CLIENT_ID_HEADER, "")
                converted = _convert(body, client_id)
                rename = converted.param
                call.describe(converted.request)
                when = None if timeout is None else asyncio.get_running_loop().time() + timeout
                async with deadline_at(when):
                    stream = await self.door.open(converted.request, tenant, headers, timeout)
                async with contextlib.aclosing(stream):  # leaving early aborts the request
                    reply = Reply(request, call, endpoint, body, rename, when)
                    return await reply.run(stream)
            except RequestError as exc:
                call.fail(exc.code, exc.message)
                call.respond(errors.http_status(exc.code))
                return error_response(exc, rename)


def _headers(request: web.Request) -> Headers:
    """The request's headers as gRPC-style metadata: lower-case names, in order."""
    return [(name.lower(), value) for name, value in request.headers.items()]


def _convert(
    body: p.ChatCompletionRequest | p.CompletionRequest, client_id: str
) -> convert.Converted:
    if isinstance(body, p.ChatCompletionRequest):
        return convert.chat_request(body, client_id)
    return convert.completion_request(body, client_id)


def _model_card(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "id": info.served_model_name,
        "object": "model",
        "created": 0,
        "owned_by": "qwen-serve",
        "root": info.model_path,
        "parent": None,
        "max_model_len": info.max_context_tokens,
    }


@contextlib.asynccontextmanager
async def deadline_at(when: float | None) -> AsyncIterator[None]:
    """``asyncio.timeout_at(when)`` whose expiry is a DEADLINE_EXCEEDED RequestError."""
    try:
        async with asyncio.timeout_at(when):
            yield
    except TimeoutError:
        raise RequestError(DEADLINE_EXCEEDED, "", "deadline exceeded") from None


class Reply:
    """One generation request's answer: an SSE stream, or one JSON object.

    ``when`` is the deadline on the event loop's clock (None: none). The stream is
    the caller's to close (``OpenAIRoutes._generate`` does, whatever happens).
    """

    def __init__(
        self,
        request: web.Request,
        call: http_observer.HttpCall,
        endpoint: Endpoint,
        body: p.ChatCompletionRequest | p.CompletionRequest,
        rename: Callable[[str], str],
        when: float | None,
    ) -> None:
        self.request, self.call, self.endpoint = request, call, endpoint
        self.body, self.rename, self.when = body, rename, when

    def _envelope(self, started: pb.Started) -> chunks.Envelope:
        return chunks.Envelope(
            self.endpoint.kind, started.request_id, started.model, self.body.return_token_ids
        )

    @property
    def _logprobs(self) -> bool:
        if isinstance(self.body, p.ChatCompletionRequest):
            return self.body.logprobs
        return self.body.logprobs is not None

    async def run(self, stream: Stream) -> web.StreamResponse:
        """Wait for acceptance (errors before it are HTTP statuses), then answer."""
        async with deadline_at(self.when):
            first = await intake.accepted(stream)
        self.call.observe(first)
        envelope = self._envelope(first.started)
        if self.body.stream:
            return await self._sse(stream, envelope, first.started)
        async with deadline_at(self.when):
            return await self._whole(stream, envelope, first.started)

    async def _whole(
        self, stream: Stream, envelope: chunks.Envelope, started: pb.Started
    ) -> web.StreamResponse:
        folded = Folded(envelope, self._logprobs)
        error: RequestError | None = None
        async for event in stream:
            self.call.observe(event)
            if event.HasField("error"):
                error = grpc_errors.from_event(event)
            folded.add(event)
        if error is not None:
            raise error
        answer = folded.chat() if self.endpoint is CHAT else folded.completion()
        self.call.respond(200)
        return json_response(answer, headers=_id_headers(started))

    def _renderer(self, envelope: chunks.Envelope) -> chunks.ChatStream | chunks.CompletionStream:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        if self.endpoint is CHAT:
            return chunks.ChatStream(envelope, self._logprobs, include_usage)
        return chunks.CompletionStream(envelope, self._logprobs, include_usage)

    async def _sse(
        self, stream: Stream, envelope: chunks.Envelope, started: pb.Started
    ) -> web.StreamResponse:
        """200 and the chunks; a failure from here on is an error event before ``[DONE]``."""
        renderer = self._renderer(envelope)
        response = web.StreamResponse(headers={**SSE_HEADERS, **_id_headers(started)})
        await response.prepare(self.request)
        self.call.respond(200)
        try:
            async with deadline_at(self.when):
                async for event in stream:
                    self.call.observe(event)
                    if event.HasField("error"):
                        error = grpc_errors.from_event(event)
                        await response.write(errors.sse_event(error, self.rename))
                        continue
                    out = renderer.chunks(event)
                    if out:
                        await response.write(b"".join(chunks.sse(c) for c in out))
        except RequestError as exc:
            self.call.fail(exc.code, exc.message)
            await response.write(errors.sse_event(exc, self.rename))
        await response.write(chunks.DONE)
        await response.write_eof()
        return response


def _id_headers(started: pb.Started) -> dict[str, str]:
    headers = {"x-qwen-serve-request-id": started.request_id}
    if started.client_request_id:
        headers[convert.CLIENT_ID_HEADER] = started.client_request_id
    return headers
