"""Tracing, metrics and structured logs.

End to end: a real OTLP/gRPC receiver runs in this process (tests/otlp_receiver.py);
a stack of its own (redis-server, a worker with the CPU engine, a router) exports
to it through the standard OTEL_* variables, serves Prometheus metrics and logs
JSON. Each request must make one connected trace: client → router server span →
producer → worker consumer → GenAI span → vLLM's own request span.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from qwen_serve import metrics, telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import RouterQueue, connect
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import SharedSettings, WorkerSettings
from qwen_serve_dev import devstack
from router.jobs import make_job
from tests.otlp_receiver import OtlpReceiver, one
from tests.support.calls import Collected, chat, collect

ROUTER, WORKER = "qwen-serve-router", "qwen-serve-worker"
DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "dashboards" / "qwen-serve.json"
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------ units


def test_tracing_is_off_unless_an_exporter_or_endpoint_is_set() -> None:
    assert telemetry.tracing_config({}) is None
    assert telemetry.tracing_config({"OTEL_TRACES_EXPORTER": "none"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert telemetry.tracing_config({**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert telemetry.tracing_config(endpoint) == telemetry.TracingConfig(
        ("otlp",), "grpc", "http://collector:4317"
    )
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_EXPORTER": "otlp"}
    assert telemetry.tracing_config(http) == telemetry.TracingConfig(
        ("otlp",), "http/protobuf", "http://localhost:4318/v1/traces"
    )
    console = telemetry.tracing_config({"OTEL_TRACES_EXPORTER": "console"})
    assert console == telemetry.TracingConfig(("console",), "grpc", "")
    with pytest.raises(ValueError, match="zipkin"):
        telemetry.tracing_config({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/json"):
        telemetry.tracing_config({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_quiet_sampler_keeps_request_spans_and_drops_background_redis_calls() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=telemetry.QuietSampler(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("heartbeat", kind=SpanKind.CLIENT):
        pass  # a Redis call outside any request
    with tracer.start_as_current_span("Inference/Chat", kind=SpanKind.SERVER):
        with tracer.start_as_current_span("SET", kind=SpanKind.CLIENT):
            pass
        with tracer.start_as_current_span("XREADGROUP", kind=SpanKind.CLIENT):
            pass  # a blocking poll, even inside a trace
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["Inference/Chat", "SET"]


def test_json_log_lines_carry_request_trace_and_span_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(telemetry.ContextFilter())
    handler.setFormatter(telemetry.JsonFormatter("svc"))
    log = logging.getLogger("tests.telemetry.json")
    log.addHandler(handler)
    log.propagate = False
    tracer = TracerProvider().get_tracer("test")
    token = telemetry.REQUEST_ID.set("req_abc")
    try:
        with tracer.start_as_current_span("work") as span:
            log.warning("hello %s", "there")
    finally:
        telemetry.REQUEST_ID.reset(token)
    line = json.loads(stream.getvalue())
    context = span.get_span_context()
    assert line["message"] == "hello there" and line["level"] == "WARNING"
    assert line["service"] == "svc" and line["request_id"] == "req_abc"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"


def test_router_and_worker_metrics_have_distinct_names() -> None:
    registry = CollectorRegistry()
    metrics.RouterMetrics(registry)
    metrics.WorkerMetrics(registry)  # a duplicate name would raise here
    names = {family.name for family in registry.collect()}
    assert "gen_ai_server_time_to_first_token_seconds" in names
    assert "gen_ai_client_token_usage" in names
    assert "qwen_serve_engine_kv_cache_usage_ratio" in names


def test_the_dashboard_charts_every_metric_and_only_those() -> None:
    registry = CollectorRegistry()
    metrics.RouterMetrics(registry)
    metrics.WorkerMetrics(registry)
    metrics.ProcessMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    charted = {
        name for expr in exprs for name in re.findall(r"\b((?:qwen_serve|gen_ai)_\w+)\{", expr)
    }
    assert charted <= exported
    assert {family.name for family in registry.collect()} <= {
        re.sub(r"_(total|bucket|sum|count)$", "", name) for name in charted
    }


def test_content_capture_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().trace_content is False
    monkeypatch.setenv("QS_TRACE_CONTENT", "true")
    assert WorkerSettings().trace_content is True


# ------------------------------------------------------------------ the traced stack


@dataclass
class TracedStack:
    """A stack exporting to ``receiver``, with metrics on two ports."""

    receiver: OtlpReceiver
    target: str
    router_metrics_port: int
    worker_metrics_port: int
    log_dir: Path
    redis_url: str


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[TracedStack]:
    """redis-server, a worker and a router exporting traces to an in-process receiver."""
    log_dir = tmp_path_factory.mktemp("traced")
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "QS_LOG_FORMAT": "json",
        }
        redis, redis_url = devstack.start_redis(log_dir)
        procs = [redis]
        port, router_mp, worker_mp = (devstack.free_port() for _ in range(3))
        try:
            procs.append(
                devstack.start_worker(
                    redis_url,
                    log_dir,
                    "--metrics-port",
                    str(worker_mp),
                    env={**env, "QS_TRACE_CONTENT": "true"},
                )
            )
            procs.append(
                devstack.start_router(
                    redis_url, port, log_dir, "--metrics-port", str(router_mp), env=env
                )
            )
            target = f"127.0.0.1:{port}"
            devstack.wait_serving(target, procs)
            yield TracedStack(receiver, target, router_mp, worker_mp, log_dir, redis_url)
        finally:
            for proc in reversed(procs):
                proc.stop()


@pytest.fixture
async def traced_stub(traced: TracedStack) -> AsyncIterator[serve_pb2_grpc.InferenceStub]:
    """An Inference stub to the traced stack's router (one channel per test)."""
    channel = grpc.aio.insecure_channel(traced.target)
    try:
        yield serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()


def client_traceparent() -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A client's own trace: (trace id, span id, metadata carrying its traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def scrape(port: int) -> Samples:
    """Every sample of a /metrics endpoint, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# ------------------------------------------------------------------ end to end


@pytest.mark.e2e
async def test_each_request_is_one_connected_trace(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    clients = [client_traceparent() for _ in range(2)]
    requests = [chat(f"Trace me {i}", max_tokens=6, top_p=0.9) for i in range(2)]
    results = await asyncio.gather(
        *(collect_with(traced_stub, r, md) for r, (_, _, md) in zip(requests, clients, strict=True))
    )
    for (trace_id, client_span, _), result in zip(clients, results, strict=True):
        trace = traced.receiver.wait_trace(
            trace_id, "llm_request", "qwen_serve.api.v1.Inference/Chat"
        )
        request_id = result.of("started")[0].started.request_id
        server = one(trace, service=ROUTER, kind="SERVER")
        producer = one(trace, service=ROUTER, kind="PRODUCER")
        consumer = one(trace, service=WORKER, kind="CONSUMER")
        gen = one(trace, service=WORKER, name="chat qwen3.5-tiny")
        engine = one(trace, name="llm_request")
        assert server.parent_id == client_span and not server.is_error
        assert producer.parent_id == server.span_id
        assert consumer.parent_id == producer.span_id
        assert (trace_id, producer.span_id) in consumer.links
        assert gen.parent_id == consumer.span_id
        assert engine.parent_id == gen.span_id and engine.service == WORKER
        assert one(trace, name="queue wait").parent_id == producer.span_id
        for name in ("time to first token", "stream"):
            assert one(trace, name=name).parent_id == gen.span_id
        usage = result.of("usage")[0].usage
        for span in (server, gen):
            attrs = span.attributes
            assert attrs["gen_ai.operation.name"] == "chat"
            assert attrs["gen_ai.provider.name"] == "vllm"
            assert attrs["gen_ai.request.max_tokens"] == 6
            assert attrs["gen_ai.request.temperature"] == 0.0
            assert attrs["gen_ai.request.top_p"] == pytest.approx(0.9)
            assert attrs["gen_ai.response.id"] == request_id
            assert attrs["gen_ai.response.model"] == "qwen3.5-tiny"
            assert attrs["gen_ai.response.finish_reasons"] == ["length"]
            assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
            assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens == 6
            assert attrs["gen_ai.usage.reasoning.output_tokens"] == 0
            assert "gen_ai.usage.cache_read.input_tokens" in attrs
        assert consumer.attributes["qwen_serve.request_id"] == request_id
        # QS_TRACE_CONTENT is on for this worker: the prompt and output are recorded.
        assert "Trace me" in gen.attributes["gen_ai.input.messages"]
        output = json.loads(gen.attributes["gen_ai.output.messages"])
        assert output[0]["finish_reason"] == "length"
        assert "gen_ai.input.messages" not in server.attributes


async def collect_with(
    stub: serve_pb2_grpc.InferenceStub,
    request: pb.ChatRequest,
    metadata: tuple[tuple[str, str], ...],
) -> Collected:
    """Run one chat with ``metadata`` to its end (see tests.support.calls.collect)."""
    out = Collected()
    async for event in stub.Chat(request, metadata=metadata, timeout=120):
        out.events.append(event)
    return out


@pytest.mark.e2e
async def test_a_rejected_request_is_an_error_span(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    trace_id, client_span, metadata = client_traceparent()
    bad = chat("hi", max_tokens=4)
    bad.sampling.temperature = -1.0
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect_with(traced_stub, bad, metadata)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trace = traced.receiver.wait_trace(trace_id, "qwen_serve.api.v1.Inference/Chat")
    server = one(trace, kind="SERVER")
    assert server.parent_id == client_span and server.is_error
    assert server.attributes["error.type"] == "INVALID_ARGUMENT"
    assert server.attributes["rpc.grpc.status_code"] == 3
    assert "sampling.temperature" in server.status_message
    assert [s.kind for s in trace] == ["SERVER"]  # nothing was queued


@pytest.mark.e2e
async def test_a_request_the_worker_rejects_is_an_error_on_both_sides(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    worker_before = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    trace_id, _, metadata = client_traceparent()
    seeded = chat("hi", max_tokens=4, seed=7)  # the CPU engine refuses per-request seeds
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect_with(traced_stub, seeded, metadata)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trace = traced.receiver.wait_trace(
        trace_id, "qwen_serve.api.v1.Inference/Chat", "process qs:jobs", "chat qwen3.5-tiny"
    )
    server, consumer = one(trace, kind="SERVER"), one(trace, kind="CONSUMER")
    gen = one(trace, name="chat qwen3.5-tiny")
    for span in (server, consumer, gen):
        assert span.is_error and span.attributes["error.type"] == "INVALID_ARGUMENT", span.name
        assert "sampling.seed" in span.status_message
    assert consumer.attributes["qwen_serve.outcome"] == "INVALID_ARGUMENT"
    worker = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    name, outcome = "qwen_serve_worker_jobs_total", {"outcome": "INVALID_ARGUMENT"}
    assert value(worker, name, **outcome) == value(worker_before, name, **outcome) + 1


@pytest.mark.e2e
async def test_a_cancelled_stream_is_recorded_on_both_sides(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    router_before = await asyncio.to_thread(scrape, traced.router_metrics_port)
    worker_before = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    trace_id, _, metadata = client_traceparent()
    call = traced_stub.Chat(chat("Go on", max_tokens=3000, ignore_eos=True), metadata=metadata)
    deltas = 0
    async for event in call:
        deltas += event.HasField("delta")
        if deltas == 3:
            break
    engine = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    assert value(engine, "qwen_serve_engine_requests_running", engine="0") >= 1
    assert value(engine, "qwen_serve_engine_kv_cache_usage_ratio", engine="0") > 0
    call.cancel()
    trace = traced.receiver.wait_trace(
        trace_id, "qwen_serve.api.v1.Inference/Chat", "chat qwen3.5-tiny", "process qs:jobs"
    )
    server = one(trace, kind="SERVER")
    assert server.is_error and server.attributes["error.type"] == "CANCELLED"
    gen = one(trace, name="chat qwen3.5-tiny")
    assert gen.is_error and gen.attributes["gen_ai.response.finish_reasons"] == ["abort"]
    assert one(trace, kind="CONSUMER").attributes["qwen_serve.outcome"] == "aborted"
    router = await asyncio.to_thread(scrape, traced.router_metrics_port)
    worker = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    for samples, before, name, labels in (
        (router, router_before, "qwen_serve_aborts_total", {"reason": "cancelled"}),
        (
            router,
            router_before,
            "qwen_serve_requests_total",
            {"method": "Chat", "code": "CANCELLED"},
        ),
        (worker, worker_before, "qwen_serve_worker_jobs_total", {"outcome": "aborted"}),
    ):
        assert value(samples, name, **labels) == value(before, name, **labels) + 1, name


@pytest.mark.e2e
async def test_metrics_move_as_requests_flow(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    router_before = await asyncio.to_thread(scrape, traced.router_metrics_port)
    worker_before = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    result = await collect(traced_stub, chat("Count me", max_tokens=5, ignore_eos=True))
    usage = result.of("usage")[0].usage
    abort = await traced_stub.Abort(pb.AbortRequest(request_id="req_" + "x" * 22))
    assert not abort.found
    router = await asyncio.to_thread(scrape, traced.router_metrics_port)
    worker = await asyncio.to_thread(scrape, traced.worker_metrics_port)

    def moved(samples: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    genai = {"gen_ai_operation_name": "chat", "gen_ai_response_model": "qwen3.5-tiny"}
    assert moved(router, router_before, "qwen_serve_requests_total", method="Chat", code="OK") == 1
    assert moved(router, router_before, "qwen_serve_requests_total", method="Abort", code="OK") == 1
    assert moved(router, router_before, "qwen_serve_aborts_total", reason="abort_rpc") == 1
    for name in (
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
    ):
        assert moved(router, router_before, name, **genai) == 1, name
    duration = "gen_ai_server_request_duration_seconds_count"
    assert moved(router, router_before, duration, **genai, error_type="") == 1
    usage_sum = "gen_ai_client_token_usage_sum"
    assert moved(router, router_before, usage_sum, **genai, gen_ai_token_type="input") == (
        usage.prompt_tokens
    )
    assert moved(router, router_before, usage_sum, **genai, gen_ai_token_type="output") == 5
    assert moved(router, router_before, "qwen_serve_tokens_total", type="output") == 5
    assert ("qwen_serve_queue_depth", frozenset()) in router
    assert value(router, "qwen_serve_workers_live") == 1
    assert moved(worker, worker_before, "qwen_serve_worker_jobs_total", outcome="ok") == 1
    for name in (
        "qwen_serve_queue_wait_seconds_count",
        "qwen_serve_engine_time_to_first_token_seconds_count",
        "qwen_serve_worker_job_duration_seconds_count",
    ):
        assert moved(worker, worker_before, name) == 1, name
    assert moved(worker, worker_before, "qwen_serve_engine_inter_token_latency_seconds_count") == 4
    stage, names = "qwen_serve_worker_start_stage_seconds", ("prepare", "lease", "engine")
    for name in names:
        assert moved(worker, worker_before, f"{stage}_count", stage=name) == 1, name
    stages = sum(moved(worker, worker_before, f"{stage}_sum", stage=name) for name in names)
    ttft = moved(worker, worker_before, "qwen_serve_engine_time_to_first_token_seconds_sum")
    assert stages == pytest.approx(ttft, abs=0.005)  # the stages split the claim-to-first-output
    assert moved(worker, worker_before, "qwen_serve_worker_claim_batch_jobs_sum") == 1
    assert value(worker, "qwen_serve_worker_capacity") == 8
    assert any(name.startswith("vllm:") for name, _ in worker)  # vLLM's own metrics too


@pytest.mark.e2e
async def test_logs_are_json_lines_with_request_and_trace_ids(
    traced: TracedStack, traced_stub: serve_pb2_grpc.InferenceStub
) -> None:
    await collect(traced_stub, chat("Log me", max_tokens=2))
    router_lines = (traced.log_dir / "router.log").read_text().splitlines()
    records = [json.loads(line) for line in router_lines if line.startswith("{")]
    assert any(r["message"].startswith("router ") and r["service"] == ROUTER for r in records)
    assert not [line for line in router_lines if TEXT_LOG_LINE.match(line)]
    worker_lines = (traced.log_dir / "worker.log").read_text().splitlines()
    records = [json.loads(line) for line in worker_lines if line.startswith("{")]
    assert not [line for line in worker_lines if TEXT_LOG_LINE.match(line)]
    # vLLM's lines go through the same formatter, and a line logged while a job
    # runs (vLLM's first chat render) carries that job's request, trace and span ids.
    assert {"worker", "vllm"} <= {r["logger"].split(".")[0] for r in records}
    in_request = [r for r in records if r.get("request_id", "").startswith("req_")]
    assert in_request
    assert all(re.fullmatch("[0-9a-f]{32}", r["trace_id"]) for r in in_request)
    assert all(re.fullmatch("[0-9a-f]{16}", r["span_id"]) for r in in_request)


@pytest.mark.e2e
async def test_a_job_cancelled_before_it_started_counts_as_aborted(traced: TracedStack) -> None:
    """A job whose client cancelled while it was queued is dropped by the worker: not ok."""
    name = "qwen_serve_worker_jobs_total"
    before = await asyncio.to_thread(scrape, traced.worker_metrics_port)
    queue = RouterQueue(
        connect(SharedSettings(redis_url=traced.redis_url)), Keys(), "test-router", 5
    )
    try:
        await queue.heartbeat()
        trace_id, _, metadata = client_traceparent()
        job = make_job(
            chat("never mind", max_tokens=4),
            router_id="test-router",
            reply_stream=queue.reply_stream,
            deadline_unix_ms=0,
            trace=dict(metadata),
        )
        await queue.announce_aborts([(job.request_id, job.tenant)])  # cancelled before the claim
        await queue.submit([job])
        consumer = one(traced.receiver.wait_trace(trace_id, "process qs:jobs"), kind="CONSUMER")
    finally:
        await queue.close()
    assert consumer.attributes["qwen_serve.outcome"] == "aborted"
    for _ in range(100):  # the span ends just before the count moves
        after = await asyncio.to_thread(scrape, traced.worker_metrics_port)
        if value(after, name, outcome="aborted") > value(before, name, outcome="aborted"):
            break
        await asyncio.sleep(0.2)
    assert value(after, name, outcome="aborted") == value(before, name, outcome="aborted") + 1
    assert value(after, name, outcome="ok") == value(before, name, outcome="ok")
