"""The server span, status and count of every ``qwen_serve.api.v1.Inference`` RPC.

:class:`ServerObserver`, a grpc.aio server interceptor, opens the server span of
every Inference call, parented by the W3C trace context of the call's metadata,
with the GenAI request attributes; it ends the span with the call's status (an
``abort_with_status`` rejection, a cancellation or an Error event included) and
counts the call (``router/call_record.py``). Health and reflection are not traced.

Why not ``opentelemetry-instrumentation-grpc``'s aio interceptor: it handles our
async-generator servicers, but it leaves the span status unset when a call ends
with ``context.abort_with_status`` (how every rejection here ends, for its rich
details) or is cancelled, and it has no hook for counting calls by status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from qwen_serve import telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from router.call_record import CURRENT, TRACER, Call

SERVICE = "qwen_serve.api.v1.Inference"
PREFIX = f"/{SERVICE}/"


def _carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _start_call(method: str, request: Any, context: grpc.aio.ServicerContext) -> Call:
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
    span = TRACER.start_span(
        f"{SERVICE}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
    )
    return Call(method, span, operation)


def _on_exception(call: Call, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
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
        CURRENT.set(call)
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
