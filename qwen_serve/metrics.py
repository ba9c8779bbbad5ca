"""Prometheus metrics of the router and the worker, and their ``/metrics`` endpoint.

Names follow Prometheus conventions (base units, ``_total`` counters) and the
OpenTelemetry GenAI metric names where one exists
(``gen_ai.server.time_to_first_token`` → ``gen_ai_server_time_to_first_token_seconds``;
attributes become labels with dots turned into underscores). Everything else is
``qwen_serve_*``. The two sets never share a name, so one process may hold both.
The worker's endpoint also serves vLLM's own ``vllm:*`` metrics, which vLLM
registers in the same default registry.

Metric objects are created on first use (:func:`router_metrics`,
:func:`worker_metrics`), not at import. :class:`EngineStats` is the vLLM stat
logger that sets the engine gauges from vLLM's scheduler stats.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

logger = logging.getLogger(__name__)

# Bucket boundaries advised by the GenAI semantic conventions.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
# Ours.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_response_model")


class RouterMetrics:
    """What a router measures: calls, admission, GenAI latencies and tokens."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.requests = Counter(
            "qwen_serve_requests",
            "Inference calls by method (gRPC method, or HTTP route such as "
            "'POST /v1/chat/completions') and final gRPC status code; a stream that ends "
            "with an Error event counts with that event's code.",
            ["method", "code"],
            **kw,
        )
        self.in_flight = Gauge(
            "qwen_serve_requests_in_flight", "Streams open on this router.", **kw
        )
        self.queue_depth = Gauge(
            "qwen_serve_queue_depth", "Jobs waiting unclaimed, as this router last saw.", **kw
        )
        self.live_workers = Gauge(
            "qwen_serve_workers_live", "Workers with a fresh heartbeat, as last seen.", **kw
        )
        self.aborts = Counter(
            "qwen_serve_aborts",
            "Requests this router aborted, by reason: cancelled, deadline, abort_rpc.",
            ["reason"],
            **kw,
        )
        self.tokens = Counter(
            "qwen_serve_tokens",
            "Tokens of finished requests by type: prompt, output, reasoning, cached.",
            ["type"],
            **kw,
        )
        self.tenant_requests = Counter(
            "qwen_serve_tenant_requests",
            "Requests by tenant ('anonymous' without API keys) and admission outcome: "
            "admitted, or limited (refused by the tenant's limits).",
            ["tenant", "outcome"],
            **kw,
        )
        self.tenant_tokens = Counter(
            "qwen_serve_tenant_tokens",
            "Tokens of a tenant's finished requests by type: prompt, output.",
            ["tenant", "type"],
            **kw,
        )
        self.placements = Counter(
            "qwen_serve_placements",
            "New jobs by where they were queued: placed (a worker's own stream, by their "
            "prompt's prefix), shared (every worker at its load bound, or not placed: HIGH, "
            "LOW, placement off), moved (placed, not started in time: to the shared stream).",
            ["outcome"],
            **kw,
        )
        self._genai(kw)

    def _genai(self, kw: dict[str, Any]) -> None:
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Chat/Generate call duration as the router sees it (gen_ai.server.request.duration).",
            [*GENAI_LABELS, "error_type"],
            buckets=DURATION_BUCKETS,
            **kw,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "From the call's arrival to its first output token, queue wait included.",
            GENAI_LABELS,
            buckets=TTFT_BUCKETS,
            **kw,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Per request: (duration - time to first token) / (output tokens - 1).",
            GENAI_LABELS,
            buckets=TPOT_BUCKETS,
            **kw,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request by gen_ai.token.type (input, output).",
            [*GENAI_LABELS, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            **kw,
        )


class WorkerMetrics:
    """What a worker measures: jobs, queue wait, engine latencies, recovery, engine state."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.jobs = Counter(
            "qwen_serve_worker_jobs",
            "Jobs this worker ended, by outcome: ok, aborted, or the error's gRPC code name.",
            ["outcome"],
            **kw,
        )
        self.running = Gauge("qwen_serve_worker_jobs_running", "Jobs this worker runs now.", **kw)
        self.capacity = Gauge("qwen_serve_worker_capacity", "Jobs this worker runs at most.", **kw)
        self.queue_wait = Histogram(
            "qwen_serve_queue_wait_seconds",
            "From a job's submission by its router to its claim by this worker.",
            buckets=WAIT_BUCKETS,
            **kw,
        )
        self.ttft = Histogram(
            "qwen_serve_engine_time_to_first_token_seconds",
            "From claim to the engine's first output: rendering, engine queue and prefill.",
            buckets=TTFT_BUCKETS,
            **kw,
        )
        self.start_stage = Histogram(
            "qwen_serve_worker_start_stage_seconds",
            "The claim-to-first-output time by stage: prepare (claim to the prompt rendered), "
            "lease (rendered to the lease's answer; 0 when it came first), engine (the "
            "generate call to the first output: the engine's queue and prefill).",
            ["stage"],
            buckets=TTFT_BUCKETS,
            **kw,
        )
        self.claim_batch = Histogram(
            "qwen_serve_worker_claim_batch_jobs",
            "Jobs per claim that returned any: how many jobs reach the engine together.",
            buckets=BATCH_BUCKETS,
            **kw,
        )
        self.itl = Histogram(
            "qwen_serve_engine_inter_token_latency_seconds",
            "Between output tokens of choice 0 (an output's gap over its token count).",
            buckets=ITL_BUCKETS,
            **kw,
        )
        self.duration = Histogram(
            "qwen_serve_worker_job_duration_seconds",
            "From claim to the job's end.",
            buckets=DURATION_BUCKETS,
            **kw,
        )
        self.reclaimed = Counter(
            "qwen_serve_jobs_reclaimed", "Jobs this worker took over from lost workers.", **kw
        )
        self.dead_lettered = Counter(
            "qwen_serve_jobs_dead_lettered", "Jobs this worker moved to the dead letters.", **kw
        )
        self._engine_gauges(kw)

    def _engine_gauges(self, kw: dict[str, Any]) -> None:
        self.kv_cache_usage = Gauge(
            "qwen_serve_engine_kv_cache_usage_ratio",
            "Share of the KV cache in use (0-1), from vLLM's scheduler stats.",
            ["engine"],
            **kw,
        )
        self.engine_running = Gauge(
            "qwen_serve_engine_requests_running",
            "Sequences the engine runs, from vLLM's scheduler stats.",
            ["engine"],
            **kw,
        )
        self.engine_waiting = Gauge(
            "qwen_serve_engine_requests_waiting",
            "Sequences waiting in the engine's scheduler, from vLLM's scheduler stats.",
            ["engine"],
            **kw,
        )
        self.preemptions = Counter(
            "qwen_serve_engine_preemptions",
            "Sequences the engine preempted, from vLLM's iteration stats.",
            ["engine"],
            **kw,
        )


class EngineStats:
    """A vLLM stat logger (``StatLoggerBase``'s interface; its stats are no stable API)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine = str(engine_index)
        self.metrics = worker_metrics()
        self._series: dict[int, tuple[Any, Any, Any, Any]] = {}

    def _of(self, engine_idx: int) -> tuple[Any, Any, Any, Any]:
        """One engine's labelled series, looked up once (``record`` runs every step)."""
        series = self._series.get(engine_idx)
        if series is None:
            m, engine = self.metrics, str(engine_idx)
            series = self._series[engine_idx] = (
                m.kv_cache_usage.labels(engine),
                m.engine_running.labels(engine),
                m.engine_waiting.labels(engine),
                m.preemptions.labels(engine),
            )
        return series

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        """Set the gauges from one step's stats."""
        kv_cache, running, waiting, preemptions = self._of(engine_idx)
        if scheduler_stats is not None:
            kv_cache.set(scheduler_stats.kv_cache_usage)
            running.set(scheduler_stats.num_running_reqs)
            waiting.set(scheduler_stats.num_waiting_reqs)
        if iteration_stats is not None and iteration_stats.num_preempted_reqs:
            preemptions.inc(iteration_stats.num_preempted_reqs)

    def log(self) -> None:
        """Nothing to print: the gauges are scraped."""

    def log_engine_initialized(self) -> None:
        """Nothing to print."""


class ProcessMetrics:
    """What every qwen-serve process measures of itself: garbage-collection pauses."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.gc_pause = Histogram(
            "qwen_serve_gc_pause_seconds",
            "Garbage collections of this process by generation and how long each took: a "
            "collection stops the process's event loop, so every stream it serves waits.",
            ["generation"],
            buckets=GC_BUCKETS,
            registry=registry,
        )


@functools.cache
def process_metrics() -> ProcessMetrics:
    """This process's metrics in the default registry; times every collection from now on."""
    m = ProcessMetrics()
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            m.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    return m


@functools.cache
def router_metrics() -> RouterMetrics:
    """The router's metrics in the default registry (created once)."""
    process_metrics()
    return RouterMetrics()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The worker's metrics in the default registry (created once)."""
    process_metrics()
    return WorkerMetrics()


def serve(port: int | None, host: str = "0.0.0.0") -> int | None:
    """Serve the default registry on ``host:port`` from a daemon thread; None: no endpoint.

    Returns the bound port. Fails (OSError) when the port is taken: a metrics port
    is deployment configuration, and a silent gap in monitoring is worse than no start.
    """
    if port is None:
        return None
    server, _thread = _start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound
