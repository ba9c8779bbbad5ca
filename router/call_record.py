"""What the router records about one call, gRPC or HTTP: its span, outcome and metrics.

A :class:`Call` takes the events the client is about to receive (time to first
token, finish reasons, usage, a terminal Error) and, when the call ends, closes
its server span and counts it. ``CURRENT`` holds the call of the running task:
``router/grpc_observer.py`` and ``router/http_observer.py`` set it, and the hooks
in ``router/observability.py`` read it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from qwen_serve import metrics, telemetry
from qwen_serve.api.v1 import serve_pb2 as pb

TRACER = telemetry.tracer("router.observability")
"""The tracer of every router span (one instrumentation scope for the router)."""


@dataclass
class Call:
    """What the router learns about one call while it runs."""

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
            self.fail(status_code(event.error.code), event.error.message)

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


CURRENT: ContextVar[Call | None] = ContextVar("qwen_serve_router_call", default=None)
"""The call the running task serves (None outside an observed call)."""


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code of a code number (UNKNOWN for an unknown one)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
