"""Errors that carry a gRPC status, shared by router and worker (no gRPC import).

Codes are gRPC status code numbers so the worker can send them through the
queue without depending on grpc.
"""

from __future__ import annotations

import re

INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16


class RequestError(Exception):
    """A request that cannot be served as sent, with the status to answer."""

    def __init__(
        self,
        code: int,
        field: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    @property
    def detail(self) -> str:
        """The message with the field it concerns."""
        return str(self)


def invalid(field: str, message: str) -> RequestError:
    """INVALID_ARGUMENT naming ``field``."""
    return RequestError(INVALID_ARGUMENT, field, message)


class EngineDeadError(RequestError):
    """The engine has died; the request may succeed on another worker."""

    def __init__(self, message: str = "the inference engine stopped") -> None:
        super().__init__(UNAVAILABLE, "", message, retryable=True)


_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")
_NATIVE_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+\.(?:cc|cpp|h):\d+: ")
"""Time and source line that native libraries (xgrammar) put before their messages."""


def clean(text: str) -> str:
    """``text`` without object reprs and native-source prefixes, whitespace collapsed."""
    return " ".join(_NATIVE_PREFIX.sub("", _OBJECT_REPR.sub("", text)).split())


def readable(exc: BaseException) -> str:
    """The message of ``exc`` for a person: no object reprs, no wrapped data dumps.

    A message that shows objects (``<PIL.Image.Image ... at 0x7f...>``) usually wraps
    the real reason, vLLM's "Failed to apply <processor> on data=..." for one: the
    innermost such cause speaks instead.
    """
    while exc.__cause__ is not None and _OBJECT_REPR.search(str(exc)):
        exc = exc.__cause__
    return clean(str(exc)) or type(exc).__name__
