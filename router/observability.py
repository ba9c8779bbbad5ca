"""The router's observability hooks: set-up, the producer span, gauges and counters.

- :func:`setup` starts logs, traces and the metrics endpoint of a router process;
  :func:`interceptors` gives the gRPC server its observer
  (``router/grpc_observer.py``; the HTTP API's is ``router/http_observer.py``).
- :func:`observer` watches a stream's events on their way to the client, for the
  call's span and metrics (``router/call_record.py``).
- :func:`produced` opens the producer span of a job's queue write and returns its
  context as the trace headers the job carries (``trace_context``), so the worker's
  spans join the trace.
- :func:`watch` exposes the dispatcher's in-flight count, queue depth and workers;
  the rest count placements and tenants' requests and tokens.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from qwen_serve import metrics, telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import Job
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import RouterSettings
from router.call_record import CURRENT, TRACER
from router.grpc_observer import ServerObserver

if TYPE_CHECKING:
    from router.dispatcher import Dispatcher

SERVICE_NAME = "qwen-serve-router"


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


def observer() -> Callable[[pb.ChatEvent], None]:
    """What takes each event the client is about to receive, for the call's span."""
    call = CURRENT.get()
    return _ignore if call is None else call.observe


def _ignore(_event: pb.ChatEvent) -> None:
    """Outside an observed call (unit tests call the servicer directly)."""


def produced(job: Job, written: asyncio.Future[Any]) -> dict[str, str] | None:
    """Open the producer span of ``job``'s queue write; the trace headers the job should
    carry from now on (None: keep its own, as when tracing is off).

    Call before the job is queued for writing: the span ends when ``written`` resolves.
    A resubmitted job (a continuation) is parented by the context it already carries.
    """
    telemetry.REQUEST_ID.set(job.request_id)
    call = CURRENT.get()
    if call is not None:
        call.span.set_attribute("gen_ai.response.id", job.request_id)
    if not _options.tracing:
        return None  # the client's own traceparent, if any, travels unchanged
    current = trace.get_current_span().get_span_context()
    parent = None if current.is_valid else propagate.extract(dict(job.trace_context))
    span = TRACER.start_span(
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
