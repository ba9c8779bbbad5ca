"""Client exceptions: one class per thing a caller handles differently.

Every failure of a call (a gRPC status before the stream was accepted) is
raised as a subclass of :class:`QwenServeError` carrying the status code, the
server's message and, where the server sent them, the offending field
(``google.rpc.BadRequest``) and a retry hint (``google.rpc.RetryInfo``, or the
``grpc-retry-pushback-ms`` / ``retry-after-ms`` trailer). A stream that fails after
acceptance ends with a ``StreamError`` event (the call's status that follows it,
with the same code, ends iteration quietly); :meth:`ChatResult.raise_for_error`
turns it into :class:`StreamFailed`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from qwen_serve_client.events import StreamError


class QwenServeError(Exception):
    """Base of every client error."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field: str = "",
        retry_after: float | None = None,
        target: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.retry_after = retry_after
        self.target = target


class ConnectError(QwenServeError):
    """UNAVAILABLE: the router cannot be reached, or has no worker or Redis right now."""


class AuthError(QwenServeError):
    """UNAUTHENTICATED or PERMISSION_DENIED: the API key is missing, wrong or not allowed."""


class InvalidRequest(QwenServeError):
    """INVALID_ARGUMENT: the request is malformed; ``field`` names the offending field."""


class NotFound(QwenServeError):
    """NOT_FOUND: e.g. the model name is not served."""


class Overloaded(QwenServeError):
    """RESOURCE_EXHAUSTED: too many requests; ``retry_after`` seconds is the server's hint."""


class DeadlineExceeded(QwenServeError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class Cancelled(QwenServeError):
    """CANCELLED: the call was cancelled (by this client)."""


class RpcFailed(QwenServeError):
    """Any other status (INTERNAL, UNIMPLEMENTED, ...)."""


class StreamFailed(QwenServeError):
    """The request was accepted, then failed (its stream ended with an Error event)."""

    def __init__(self, error: StreamError, request_id: str = "") -> None:
        super().__init__(error.message, code=error.status, field=error.field)
        self.retryable = error.retryable
        self.request_id = request_id


_BY_CODE: dict[grpc.StatusCode, type[QwenServeError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


RETRY_TRAILERS = ("grpc-retry-pushback-ms", "retry-after-ms")
"""Trailers carrying the server's retry hint in milliseconds (gRPC's standard one first)."""


def retry_after(call: Any) -> float | None:
    """The server's retry hint in seconds (RetryInfo detail or a retry trailer)."""
    for key, value in call.trailing_metadata() or ():
        if key in RETRY_TRAILERS:
            with contextlib.suppress(ValueError):
                return int(value) / 1000
    for detail in _details(call):
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def bad_field(call: Any) -> str:
    """The first field named by a ``google.rpc.BadRequest`` detail ("" if none)."""
    for detail in _details(call):
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return str(bad.field_violations[0].field)
    return ""


def _details(call: Any) -> list[Any]:
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # status details that do not match the code/message
        return []
    return list(status.details) if status is not None else []


def from_rpc_error(exc: grpc.RpcError, target: str = "") -> QwenServeError:
    """The client error for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    cls = _BY_CODE.get(code, RpcFailed)
    message = details
    if cls is ConnectError and target:
        message = f"{details} (target {target})"
    elif cls is AuthError:
        message = f"{details} (check the API key: api_key=, --api-key or $QWEN_SERVE_API_KEY)"
    return cls(
        message,
        code=code,
        field=bad_field(exc),
        retry_after=retry_after(exc),
        target=target,
    )
