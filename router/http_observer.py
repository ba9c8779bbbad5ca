"""The server span and count of every call of the OpenAI-compatible HTTP API.

:func:`http_call` opens the span (parented by the ``traceparent`` header) and
holds the call's :class:`~router.call_record.Call`, the same bookkeeping as a gRPC
call's; the routes (``router/openai/app.py``) report to it through :class:`HttpCall`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from qwen_serve import telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from router.call_record import CURRENT, TRACER, Call, status_code


class HttpCall:
    """One call of the OpenAI-compatible HTTP API, as its span and metrics see it.

    The same bookkeeping as a gRPC call (``Call``): the call counts under its route
    (``POST /v1/chat/completions``) with the gRPC code of its outcome, and the GenAI
    metrics and attributes are the same.
    """

    def __init__(self, call: Call) -> None:
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
        self._call.fail(status_code(code), message)

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
    span = TRACER.start_span(
        name, context=propagate.extract(headers), kind=SpanKind.SERVER, attributes=attributes
    )
    call = Call(name, span, protocol="http")
    token = CURRENT.set(call)
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
        CURRENT.reset(token)
        call.end()
