"""The router's spans and metrics.

- :class:`ServerObserver`, a grpc.aio server interceptor, opens the server span of
  every ``qwen_serve.api.v1.Inference`` call, parented by the W3C trace context of
  the call's metadata, with the GenAI request attributes; it ends the span with the
  call's status (an ``abort_with_status`` rejection, a cancellation or an Error
  event included) and counts the call. Health and reflection are not traced.
- :func:`observer` watches a stream's events on their way to the client: time to
  first token, finish reasons, usage, a terminal Error.
- :func:`produced` opens the producer span of a job's queue write and returns its
  context as the trace headers the job carries (``trace_context``), so the worker's
  spans join the trace.
- :func:`watch` exposes the dispatcher's in-flight count, queue depth and workers.

Why not ``opentelemetry-instrumentation-grpc``'s aio interceptor: it handles our
async-generator servicers, but it leaves the span status unset when a call ends
with ``context.abort_with_status`` (how every rejection here ends, for its rich
details) or is cancelled, and it has no hook for counting calls by status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from qwen_serve import metrics, telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import Job
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import RouterSettings

if TYPE_CHECKING:
    from router.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

SERVICE = "qwen_serve.api.v1.Inference"
PREFIX = f"/{SERVICE}/"
SERVICE_NAME = "qwen-serve-router"

_tracer = telemetry.tracer(__name__)


@dataclass
class _Options:
    tracing: bool = False
    jobs_stream: str = Keys().jobs


_options = _Options()


def setup(settings: RouterSettings) -> None:
    """Logs, traces (OTEL_* variables) and the metrics endpoint of a router process."""
    config = telemetry.setup(settings.log_format, SERVICE_NAME, settings.router_id)
    _options.tracing = config is not None
    _options.jobs_stream = Keys(settings.key_prefix).jobs
    metrics.router_metrics()
    metrics.serve(settings.metrics_port, settings.metrics_host)


def interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The router's observability interceptors (outermost first)."""
    return [ServerObserver()]


def watch(dispatcher: Dispatcher) -> None:
    """Expose the dispatcher's view as gauges (read at scrape time)."""
    m = metrics.router_metrics()
    m.in_flight.set_function(lambda: dispatcher.inflight)
    m.queue_depth.set_function(lambda: dispatcher.view.queue_depth)
    m.live_workers.set_function(lambda: len(dispatcher.view.workers))


# ------------------------------------------------------------------ one call


@dataclass
class _Call:
    """What the router learns about one Inference call while it runs."""

    method: str
    span: Span
    operation: str = ""
    protocol: str = "grpc"
    started: float = field(default_factory=time.monotonic)
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    model: str = ""
    first_token_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: pb.Usage | None = None

    def observe(self, event: pb.ChatEvent) -> None:
        """Take one event the client is about to receive."""
        kind = event.WhichOneof("event")
        if kind == "started":
            self.model = event.started.model
            self.span.set_attribute("gen_ai.response.model", event.started.model)
        elif kind == "delta" and self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started
        elif kind == "finished":
            self.finish_reasons.append(telemetry.finish_reason(event.finished))
        elif kind == "usage":
            self.usage = event.usage
        elif kind == "error":
            self.fail(_status_code(event.error.code), event.error.message)

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        """Record how the call failed."""
        self.code, self.message = code, message

    def end(self) -> None:
        """Close the span and count the call."""
        span, code = self.span, self.code
        if self.protocol == "grpc":
            span.set_attribute("rpc.grpc.status_code", code.value[0])
        if self.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
        if self.usage is not None:
            span.set_attributes(telemetry.usage_attributes(self.usage))
        if code != grpc.StatusCode.OK:
            span.set_attribute("error.type", code.name)
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {self.message}"))
        span.end()
        self._count()

    def _count(self) -> None:
        m = metrics.router_metrics()
        code = self.code
        m.requests.labels(self.method, code.name).inc()
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            m.aborts.labels("cancelled" if code == grpc.StatusCode.CANCELLED else "deadline").inc()
        elif self.method == "Abort":
            m.aborts.labels("abort_rpc").inc()
        if not self.operation:
            return
        labels = (self.operation, self.model)
        error = "" if code == grpc.StatusCode.OK else code.name
        duration = time.monotonic() - self.started
        m.duration.labels(*labels, error).observe(duration)
        if self.first_token_s is not None:
            m.ttft.labels(*labels).observe(self.first_token_s)
        usage = self.usage
        if usage is None:
            return
        if self.first_token_s is not None and usage.completion_tokens > 1:
            per_token = (duration - self.first_token_s) / (usage.completion_tokens - 1)
            m.tpot.labels(*labels).observe(per_token)
        m.token_usage.labels(*labels, "input").observe(usage.prompt_tokens)
        m.token_usage.labels(*labels, "output").observe(usage.completion_tokens)
        for kind, count in (
            ("prompt", usage.prompt_tokens),
            ("output", usage.completion_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cached", usage.cached_tokens),
        ):
            m.tokens.labels(kind).inc(count)


_CALL: ContextVar[_Call | None] = ContextVar("qwen_serve_router_call", default=None)


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _start_call(method: str, request: Any, context: grpc.aio.ServicerContext) -> _Call:
    parent = propagate.extract(_carrier(context.invocation_metadata()))
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": method,
    }
    operation = ""
    if isinstance(request, pb.ChatRequest | pb.GenerateRequest):
        operation = telemetry.operation_name(request)
        attributes.update(telemetry.request_attributes(request))
    span = _tracer.start_span(
        f"{SERVICE}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
    )
    return _Call(method, span, operation)


def _on_exception(call: _Call, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    """Record how an exception ended the call."""
    if isinstance(exc, grpc.aio.AbortError):
        call.fail(context.code() or grpc.StatusCode.UNKNOWN, str(context.details() or ""))
    elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        call.fail(code, "deadline exceeded" if expired else "cancelled by the client")
    else:
        call.span.record_exception(exc)
        call.fail(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")


class ServerObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Server span, status and call count of every Inference RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the unary-unary and unary-stream handlers of the Inference service."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method or ""
        if handler is None or not method.startswith(PREFIX) or handler.request_streaming:
            return handler
        name = method.removeprefix(PREFIX)
        if handler.response_streaming:
            behavior, factory = (
                _stream(name, handler.unary_stream),
                grpc.unary_stream_rpc_method_handler,
            )
        else:
            behavior, factory = (
                _unary(name, handler.unary_unary),
                grpc.unary_unary_rpc_method_handler,
            )
        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _stream(name: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _start_call(name, request, context)
        # The RPC runs in a task of its own, whose context ends with it: nothing is
        # reset. (A cancelled call's generator may be closed by the garbage collector
        # in another task's context, where resetting would fail.)
        _CALL.set(call)
        otel_context.attach(trace.set_span_in_context(call.span))
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            _on_exception(call, exc, context)
            raise
        finally:
            call.end()

    return observed


def _unary(name: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _start_call(name, request, context)
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False):
                return await behavior(request, context)
        except BaseException as exc:
            _on_exception(call, exc, context)
            raise
        finally:
            call.end()

    return observed


def observer() -> Callable[[pb.ChatEvent], None]:
    """What takes each event the client is about to receive, for the call's span."""
    call = _CALL.get()
    return _ignore if call is None else call.observe


def _ignore(_event: pb.ChatEvent) -> None:
    """Outside an observed call (unit tests call the servicer directly)."""


# ------------------------------------------------------------------ HTTP calls


class HttpCall:
    """One call of the OpenAI-compatible HTTP API, as its span and metrics see it.

    The same bookkeeping as a gRPC call (``_Call``): the call counts under its route
    (``POST /v1/chat/completions``) with the gRPC code of its outcome, and the GenAI
    metrics and attributes are the same.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call

    def describe(self, request: pb.ChatRequest | pb.GenerateRequest) -> None:
        """The request, once parsed: GenAI request attributes and operation."""
        self._call.operation = telemetry.operation_name(request)
        self._call.span.set_attributes(telemetry.request_attributes(request))

    def observe(self, event: pb.ChatEvent) -> None:
        """Take one event on its way to the client."""
        self._call.observe(event)

    def fail(self, code: int, message: str) -> None:
        """Record a failure by its gRPC status code number."""
        self._call.fail(_status_code(code), message)

    def respond(self, status: int) -> None:
        """Record the HTTP status answered."""
        self._call.span.set_attribute("http.response.status_code", status)


@contextlib.contextmanager
def http_call(method: str, route: str, headers: Mapping[str, str]) -> Iterator[HttpCall]:
    """Server span (parented by the ``traceparent`` header) and count of one HTTP call.

    A cancellation or a reset connection (the client went away) counts as CANCELLED.
    """
    name = f"{method} {route}"
    attributes = {"http.request.method": method, "http.route": route}
    span = _tracer.start_span(
        name, context=propagate.extract(headers), kind=SpanKind.SERVER, attributes=attributes
    )
    call = _Call(name, span, protocol="http")
    token = _CALL.set(call)
    attached = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield HttpCall(call)
    except (asyncio.CancelledError, ConnectionResetError):
        call.fail(grpc.StatusCode.CANCELLED, "the client disconnected")
        raise
    except BaseException as exc:
        span.record_exception(exc)
        call.fail(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        otel_context.detach(attached)
        _CALL.reset(token)
        call.end()


# ------------------------------------------------------------------ the queue write


def produced(job: Job, written: asyncio.Future[Any]) -> dict[str, str] | None:
    """Open the producer span of ``job``'s queue write; the trace headers the job should
    carry from now on (None: keep its own, as when tracing is off).

    Call before the job is queued for writing: the span ends when ``written`` resolves.
    A resubmitted job (a continuation) is parented by the context it already carries.
    """
    telemetry.REQUEST_ID.set(job.request_id)
    call = _CALL.get()
    if call is not None:
        call.span.set_attribute("gen_ai.response.id", job.request_id)
    if not _options.tracing:
        return None  # the client's own traceparent, if any, travels unchanged
    current = trace.get_current_span().get_span_context()
    parent = None if current.is_valid else propagate.extract(dict(job.trace_context))
    span = _tracer.start_span(
        f"send {_options.jobs_stream}",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "send",
            "messaging.operation.name": "XADD",
            "messaging.destination.name": _options.jobs_stream,
            "qwen_serve.request_id": job.request_id,
            "qwen_serve.attempt": job.attempt,
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    written.add_done_callback(functools.partial(_end_producer, span))
    return carrier


def _end_producer(span: Span, written: asyncio.Future[None]) -> None:
    if written.cancelled():
        span.set_status(Status(StatusCode.ERROR, "cancelled before the write"))
    elif (exc := written.exception()) is not None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
    span.end()


def tenant_label(tenant: str) -> str:
    """A tenant as a metric label ("anonymous" when auth is off)."""
    return tenant or "anonymous"


def placement(outcome: str) -> None:
    """Count where a new job was queued: placed, shared or moved."""
    metrics.router_metrics().placements.labels(outcome).inc()


def tenant_admission(tenant: str, outcome: str) -> None:
    """Count a request of ``tenant`` admitted or limited by its tenant limits."""
    metrics.router_metrics().tenant_requests.labels(tenant_label(tenant), outcome).inc()


def tenant_tokens(tenant: str, usage: pb.Usage) -> None:
    """Count a finished request's tokens for its tenant."""
    m = metrics.router_metrics().tenant_tokens
    m.labels(tenant_label(tenant), "prompt").inc(usage.prompt_tokens)
    m.labels(tenant_label(tenant), "output").inc(usage.completion_tokens)
