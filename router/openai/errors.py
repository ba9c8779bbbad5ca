"""Failures as OpenAI's error body and HTTP status.

The same ``RequestError`` the gRPC edge turns into a status (``router/errors.py``)
becomes here ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status of its gRPC code (the mapping of Google's HTTP/JSON transcoding). A wait
hint becomes ``Retry-After`` (seconds) and ``retry-after-ms``; ``x-should-retry``
says whether sending the same request again may succeed (the OpenAI SDKs read
all three).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any, Final

from qwen_serve import errors as codes
from qwen_serve.errors import RequestError

logger = logging.getLogger(__name__)

HTTP_STATUS: Final = {
    codes.INVALID_ARGUMENT: 400,
    codes.FAILED_PRECONDITION: 400,
    codes.UNAUTHENTICATED: 401,
    7: 403,  # PERMISSION_DENIED
    codes.NOT_FOUND: 404,
    codes.ABORTED: 409,
    codes.RESOURCE_EXHAUSTED: 429,
    1: 499,  # CANCELLED
    codes.INTERNAL: 500,
    codes.UNAVAILABLE: 503,
    codes.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_CODES: Final = {
    codes.UNAUTHENTICATED: "invalid_api_key",
    codes.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
    codes.UNAVAILABLE: "service_unavailable",
    codes.DEADLINE_EXCEEDED: "timeout",
}


def http_status(code: int) -> int:
    """The HTTP status of a gRPC status code number (500 for any other)."""
    return HTTP_STATUS.get(code, 500)


def body(exc: RequestError, rename: Callable[[str], str] = lambda field: field) -> dict[str, Any]:
    """OpenAI's error object for ``exc``; ``rename`` maps a protobuf field to the argument."""
    status = http_status(exc.code)
    param = rename(exc.field) if exc.field else ""
    if exc.code == codes.NOT_FOUND and exc.field == "model":
        code: str | None = "model_not_found"
    elif param:
        code = "invalid_value" if status == 400 else ERROR_CODES.get(exc.code)
    else:
        code = ERROR_CODES.get(exc.code)
    return {
        "error": {
            "message": f"{param}: {exc.message}" if param else exc.message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param or None,
            "code": code,
        }
    }


def headers(exc: RequestError) -> dict[str, str]:
    """Retry headers for ``exc``."""
    out = {"x-should-retry": "true" if exc.retryable else "false"}
    if exc.retry_after_ms is not None:
        out["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
        out["retry-after-ms"] = str(exc.retry_after_ms)
    return out


def log(exc: RequestError) -> None:
    """Log what needs an operator's eye (INTERNAL), as the gRPC edge does."""
    if exc.code == codes.INTERNAL:
        logger.error("internal error: %s", exc.detail)


def sse_event(exc: RequestError, rename: Callable[[str], str]) -> bytes:
    """The error of a stream that already answered 200: one SSE ``data:`` event."""
    data = body(exc, rename)
    data["error"]["status"] = http_status(exc.code)
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
