"""The worker's spans and metrics.

One claimed job makes this span tree (all in the trace the router started)::

    send qs:jobs                 (router, PRODUCER; its context travels in Job.trace_context)
    ├── queue wait               (from the router's enqueue time to the claim)
    └── process qs:jobs          (CONSUMER, parented by the job's context and linked to it)
        └── chat <model>         (GenAI span: request, response and usage attributes)
            ├── time to first token
            ├── stream           (first output to the last)
            └── llm_request      (vLLM's own span: we pass this span's context as trace_headers)

:func:`process` wraps a job's task, :func:`generation` its engine stream,
:func:`failed` records its error; :func:`stage` splits its claim-to-first-output time
(prepare, lease, engine) and :func:`claimed` counts the jobs of each claim. What a
span records of the content (opt-in) is ``worker.trace_content``. :func:`stat_loggers`
hands vLLM the stat logger that feeds the engine gauges (``qwen_serve.metrics.EngineStats``).
No vLLM import here.

vLLM's request spans need ``otlp_traces_endpoint`` (:func:`engine_args`). vLLM's
``init_tracer`` then tries to install its own tracer provider; the OpenTelemetry API
refuses because :func:`setup` installed ours first, so vLLM's spans go through our
provider, resource and sampler. Its engine processes (spawned) export their start-up
spans themselves, to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from qwen_serve import metrics, telemetry
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError
from qwen_serve.queue.broker import now_ms
from qwen_serve.queue.codec import Job
from qwen_serve.queue.keys import WORKER_GROUP, Keys
from qwen_serve.settings import WorkerSettings
from worker.trace_content import OutputText, input_messages

if TYPE_CHECKING:
    from worker.service import Worker

logger = logging.getLogger(__name__)

SERVICE_NAME = "qwen-serve-worker"
_tracer = telemetry.tracer(__name__)


@dataclass
class _Options:
    tracing: bool = False
    engine_endpoint: str = ""
    trace_content: bool = False
    jobs_stream: str = Keys().jobs
    model: str = ""


_options = _Options()


def setup(settings: WorkerSettings) -> None:
    """Logs, traces (OTEL_* variables) and the metrics endpoint; call before the engine starts."""
    config = telemetry.setup(settings.log_format, SERVICE_NAME, settings.worker_id)
    _options.tracing = config is not None
    _options.trace_content = settings.trace_content
    _options.jobs_stream = Keys(settings.key_prefix).jobs
    if config is not None and config.endpoint:
        _options.engine_endpoint = config.endpoint
        # For vLLM's engine processes: they read only these two.
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", config.protocol)
        os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE_NAME)
    metrics.worker_metrics()
    metrics.serve(settings.metrics_port, settings.metrics_host)


def engine_args() -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords for tracing: vLLM's request spans need an OTLP endpoint."""
    return {"otlp_traces_endpoint": _options.engine_endpoint} if _options.engine_endpoint else {}


def stat_loggers() -> list[Any]:
    """vLLM stat logger factories (``AsyncLLM.from_engine_args(stat_loggers=...)``)."""
    return [metrics.EngineStats]


def watch(worker: Worker) -> None:
    """Expose the worker's running jobs and capacity as gauges."""
    m = metrics.worker_metrics()
    m.running.set_function(lambda: len(worker.running))
    m.capacity.set(worker.capacity)
    _options.model = worker.engine.model_info().served_model_name


def reclaimed(count: int) -> None:
    """Count jobs taken over from lost workers."""
    metrics.worker_metrics().reclaimed.inc(count)


def dead_lettered(count: int = 1) -> None:
    """Count jobs moved to the dead letters."""
    metrics.worker_metrics().dead_lettered.inc(count)


# ------------------------------------------------------------------ one job


@dataclass
class _Job:
    """What the worker learns about one job while it runs."""

    job: Job
    span: Span
    claimed: float = field(default_factory=time.monotonic)
    outcome: str = ""
    generation: _Generation | None = None
    stage_started: float = field(default_factory=time.monotonic)
    """When the current start stage began (claim, then the end of the last stage)."""

    def stage(self, name: str) -> None:
        """End the start stage ``name`` (prepare, lease, engine): one observation."""
        now = time.monotonic()
        metrics.worker_metrics().start_stage.labels(name).observe(now - self.stage_started)
        self.stage_started = now

    def end(self) -> None:
        """Close the consumer span and count the job."""
        gen, m = self.generation, metrics.worker_metrics()
        # Ok only when every choice finished: a job dropped before Started has no reasons.
        finished = (
            gen is not None and bool(gen.finish_reasons) and "abort" not in gen.finish_reasons
        )
        outcome = self.outcome or ("ok" if finished else "aborted")
        self.span.set_attribute("qwen_serve.outcome", outcome)
        self.span.end()
        m.jobs.labels(outcome).inc()
        m.duration.observe(time.monotonic() - self.claimed)


_JOB: ContextVar[_Job | None] = ContextVar("qwen_serve_worker_job", default=None)


def _begin(job: Job, entry_id: bytes) -> _Job:
    """The consumer span of a just-claimed job (and its queue-wait span and metric)."""
    parent = propagate.extract(dict(job.trace_context))
    remote = trace.get_current_span(parent).get_span_context()
    if job.enqueued_unix_ms:
        waited_ms = max(0, now_ms() - job.enqueued_unix_ms)
        metrics.worker_metrics().queue_wait.observe(waited_ms / 1000)
        if _options.tracing:
            start_ns = job.enqueued_unix_ms * 1_000_000
            wait = _tracer.start_span("queue wait", context=parent, start_time=start_ns)
            wait.set_attribute("messaging.destination.name", _options.jobs_stream)
            wait.end(end_time=start_ns + waited_ms * 1_000_000)
    span = _tracer.start_span(
        f"process {_options.jobs_stream}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=[Link(remote)] if remote.is_valid else None,
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": _options.jobs_stream,
            "messaging.consumer.group.name": WORKER_GROUP,
            "messaging.message.id": entry_id.decode(errors="replace"),
            "qwen_serve.request_id": job.request_id,
            "qwen_serve.attempt": job.attempt,
        },
    )
    return _Job(job, span)


async def process(job: Job, entry_id: bytes, work: Awaitable[None]) -> None:
    """Await ``work``, the handling of one claimed job, inside the job's consumer span.

    Run it as the job's own task: the span and the request id become that task's
    current context, so logs and the spans below it carry them.
    """
    state = _begin(job, entry_id)
    _JOB.set(state)
    telemetry.REQUEST_ID.set(job.request_id)
    token = otel_context.attach(trace.set_span_in_context(state.span))
    try:
        await work
    except BaseException as exc:
        _mark(state.span, exc)
        state.outcome = state.outcome or "CANCELLED"
        raise
    finally:
        otel_context.detach(token)
        state.end()


def stage(name: str) -> None:
    """End the current job's start stage ``name``: ``prepare`` once its prompt is rendered,
    ``lease`` once its lease is answered (the engine stage ends at the first output)."""
    state = _JOB.get()
    if state is not None:
        state.stage(name)


def claimed(jobs: int) -> None:
    """Count one claim that returned ``jobs`` jobs."""
    metrics.worker_metrics().claim_batch.observe(jobs)


def failed(exc: RequestError) -> None:
    """Record the error the current job ends with (its consumer span and outcome)."""
    state = _JOB.get()
    if state is not None:
        state.outcome = _code_name(exc.code)
        _mark(state.span, exc)


def _code_name(code: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def _mark(span: Span, exc: BaseException) -> None:
    """Status of a span an exception (or a cancellation) ended."""
    if isinstance(exc, RequestError):
        span.set_attribute("error.type", _code_name(exc.code))
        span.set_status(Status(StatusCode.ERROR, exc.detail))
    elif isinstance(exc, Exception):
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
    else:  # CancelledError, GeneratorExit: aborted, timed out or shut down
        span.set_attribute("error.type", "cancelled")
        span.set_status(Status(StatusCode.ERROR, "cancelled"))


# ------------------------------------------------------------------ the engine stream


@dataclass
class _Generation:
    """The GenAI span of one engine stream and what it measures."""

    span: Span
    ttft: Span
    claimed: float
    stream: Span | None = None
    last_token: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output: OutputText | None = None

    def observe(self, event: pb.ChatEvent) -> None:
        """Take one event of the stream."""
        now = time.monotonic()
        if self.stream is None:
            self.ttft.end()
            metrics.worker_metrics().ttft.observe(now - self.claimed)
            self.stream = _tracer.start_span("stream", context=trace.set_span_in_context(self.span))
        kind = event.WhichOneof("event")
        if kind == "delta" and event.delta.index == 0 and event.delta.token_ids:
            if self.last_token is not None:
                gap = (now - self.last_token) / len(event.delta.token_ids)
                metrics.worker_metrics().itl.observe(gap)
            self.last_token = now
        elif kind == "finished":
            self.finish_reasons.append(telemetry.finish_reason(event.finished))
        elif kind == "usage":
            self.span.set_attributes(telemetry.usage_attributes(event.usage))
        if self.output is not None:
            self.output.add(event)

    def end(self, exc: BaseException | None) -> None:
        """Close the spans (with the exception's status, if one ended the stream)."""
        if self.finish_reasons:
            self.span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
        if self.output is not None:
            self.span.set_attribute("gen_ai.output.messages", self.output.json())
        open_spans = (self.ttft,) if self.stream is None else (self.stream,)
        for span in (*open_spans, self.span):
            if exc is not None:
                _mark(span, exc)
            elif span is self.span and (not self.finish_reasons or "abort" in self.finish_reasons):
                span.set_attribute("error.type", "aborted")
                span.set_status(Status(StatusCode.ERROR, "aborted"))
            span.end()


def _start_generation(job: Job, state: _Job | None) -> _Generation:
    request = job.chat if job.HasField("chat") else job.generate
    operation = telemetry.operation_name(request)
    attributes = telemetry.request_attributes(request)
    attributes["gen_ai.response.id"] = job.request_id
    if _options.model:
        attributes["gen_ai.response.model"] = _options.model
    model = request.model or _options.model
    span = _tracer.start_span(f"{operation} {model}".strip(), attributes=attributes)
    if _options.trace_content:
        span.set_attribute("gen_ai.input.messages", input_messages(request))
    ttft = _tracer.start_span("time to first token", context=trace.set_span_in_context(span))
    claimed = state.claimed if state is not None else time.monotonic()
    output = OutputText() if _options.trace_content else None
    return _Generation(span, ttft, claimed, output=output)


async def generation(
    job: Job, events: AsyncGenerator[pb.ChatEvent, None]
) -> AsyncGenerator[pb.ChatEvent, None]:
    """Yield ``events`` (one job's engine stream) unchanged, inside the job's GenAI span.

    Its context is what :func:`engine_trace_headers` hands to vLLM, so create the
    engine stream lazily (an async generator, as ``Engine.run`` is) and pass it here.
    """
    state = _JOB.get()
    gen = _start_generation(job, state)
    if state is not None:
        state.generation = gen
    failure: BaseException | None = None
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                if gen.stream is None and state is not None:
                    state.stage("engine")
                gen.observe(event)
                yield event
        except BaseException as exc:
            failure = exc
            raise
        finally:
            gen.end(failure)


def engine_trace_headers(job: Job) -> dict[str, str] | None:
    """The ``trace_headers`` for vLLM: the current job's GenAI span; None when not traced."""
    if not _options.engine_endpoint:
        return None  # vLLM would drop them with a warning
    state = _JOB.get()
    if state is None or state.generation is None:
        return dict(job.trace_context) or None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(state.generation.span))
    return carrier
