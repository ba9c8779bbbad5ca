"""A real OTLP/gRPC trace receiver for tests, built on opentelemetry-proto's service.

It implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on a
free local port and keeps every span it receives, with the ``service.name`` of
the resource that sent it, for the tests to inspect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KIND_NAMES = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass
class ReceivedSpan:
    """One span as exported, with its ids in hex."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    links: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    start_unix_ns: int = 0
    end_unix_ns: int = 0

    @property
    def is_error(self) -> bool:
        """Whether the span's status is ERROR."""
        return self.status_code == trace_pb2.Status.STATUS_CODE_ERROR

    @classmethod
    def from_proto(cls, service: str, span: trace_pb2.Span) -> ReceivedSpan:
        """Convert an exported span."""
        return cls(
            service=service,
            name=span.name,
            kind=KIND_NAMES.get(span.kind, "UNSPECIFIED"),
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex(),
            attributes={kv.key: _value(kv.value) for kv in span.attributes},
            status_code=span.status.code,
            status_message=span.status.message,
            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
            events=[event.name for event in span.events],
            start_unix_ns=span.start_time_unix_nano,
            end_unix_ns=span.end_time_unix_nano,
        )


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans; use as a context manager to run the gRPC server."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self, self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """The URL to put in OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Keep the spans of one export."""
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            attributes = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            service = str(attributes.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                received.extend(ReceivedSpan.from_proto(service, s) for s in scope_spans.spans)
        with self._lock:
            self.spans.extend(received)
            self.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[ReceivedSpan]:
        """The spans received so far."""
        with self._lock:
            return list(self.spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 60
    ) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds; the spans then (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"spans never matched; received {len(spans)}: {names}")
            time.sleep(0.1)

    def wait_trace(self, trace_id: str, *names: str, timeout: float = 60) -> list[ReceivedSpan]:
        """The spans of one trace, once it holds a span of each of ``names``."""

        def complete(spans: list[ReceivedSpan]) -> bool:
            return set(names) <= {s.name for s in spans if s.trace_id == trace_id}

        return [s for s in self.wait_for(complete, timeout) if s.trace_id == trace_id]

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def one(spans: list[ReceivedSpan], **match: str) -> ReceivedSpan:
    """The single span whose fields equal ``match`` (AssertionError otherwise)."""
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{match}: {[(s.service, s.name, s.kind) for s in found]}"
    return found[0]
