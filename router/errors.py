"""The one place where failures become gRPC statuses.

A RequestError becomes its own code with the field in the message and in a
``google.rpc.BadRequest`` detail (also for errors the worker found, before or
after Started) and, where it carries a retry hint, a ``google.rpc.RetryInfo``
detail plus two trailers for clients that do not read rich details: gRPC's
standard ``grpc-retry-pushback-ms`` (which gRPC's own retry policies and
proxies honour) and our ``retry-after-ms``.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError

logger = logging.getLogger(__name__)


PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
"""gRPC's retry pushback (gRFC A6): milliseconds to wait before a retry."""
RETRY_AFTER_TRAILER = "retry-after-ms"


def from_event(event: pb.ChatEvent) -> RequestError:
    """The RequestError an Error event stands for (the call's status when it ends the stream)."""
    error = event.error
    message = error.message.removeprefix(f"{error.field}: ") if error.field else error.message
    return RequestError(error.code, error.field, message, retryable=error.retryable)


def to_status(exc: RequestError) -> grpc.Status:
    """The gRPC status (with rich details) that answers ``exc``."""
    details: list[any_pb2.Any] = []
    trailers: list[tuple[str, str]] = []
    if exc.retry_after_ms is not None:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=exc.retry_after_ms // 1000, nanos=(exc.retry_after_ms % 1000) * 1_000_000
            )
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
        hint = str(exc.retry_after_ms)
        trailers += [(PUSHBACK_TRAILER, hint), (RETRY_AFTER_TRAILER, hint)]
    if exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(packed)
    code = exc.code if exc.code in code_pb2.Code.values() else code_pb2.INTERNAL
    status = rpc_status.to_status(status_pb2.Status(code=code, message=exc.detail, details=details))
    if trailers:
        return _WithTrailers(status, trailers)
    return status


class _WithTrailers(grpc.Status):  # type: ignore[misc]
    """A status whose trailing metadata adds plain-text hints."""

    def __init__(self, status: grpc.Status, extra: list[tuple[str, str]]) -> None:
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = (*status.trailing_metadata, *extra)


async def abort(context: grpc.aio.ServicerContext, exc: RequestError) -> None:
    """End the RPC with the status for ``exc`` (raises, as context.abort does)."""
    if exc.code == code_pb2.INTERNAL:
        logger.error("internal error: %s", exc.detail)
    await context.abort_with_status(to_status(exc))
