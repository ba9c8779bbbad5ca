"""Logs and traces shared by router and worker.

**Logs.** ``text`` (the default) writes human-readable lines; ``json`` writes one
JSON object per line with the request id, trace id and span id of the code that
logged it (``QS_LOG_FORMAT``). ``QS_LOG_LEVEL`` sets the level (default INFO).

**Traces.** The OpenTelemetry SDK, configured from the standard variables:
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; a comma-separated list
is allowed), ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``_PROTOCOL`` (``grpc``, the
default, or ``http/protobuf``) / ``_HEADERS`` / ``_CERTIFICATE`` / ``_TIMEOUT``,
``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_BSP_*`` and ``OTEL_SDK_DISABLED``. Unlike the SDK's auto-configuration,
tracing stays off unless ``OTEL_TRACES_EXPORTER`` or an OTLP endpoint is set: the
dev default exports nothing and says nothing about it.

Redis calls are traced (``opentelemetry-instrumentation-redis``) only inside a
request's trace: :class:`QuietSampler` drops client spans without a parent (the
queue's background loops: heartbeats, reply reads, claims) and every blocking poll.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue

from qwen_serve.api.v1 import serve_pb2 as pb

logger = logging.getLogger(__name__)

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}
BLOCKING_COMMANDS = frozenset({"XREAD", "XREADGROUP", "BLPOP", "BRPOP", "BZPOPMIN", "SUBSCRIBE"})

REQUEST_ID: ContextVar[str] = ContextVar("qwen_serve_request_id", default="")
"""The request the running code serves (set per request task; logged with every line)."""


# ------------------------------------------------------------------ logs


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` of the current context to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        request_id = REQUEST_ID.get()
        context = trace.get_current_span().get_span_context()
        valid = context.is_valid
        record.__dict__.update(
            request_id=request_id,
            trace_id=trace.format_trace_id(context.trace_id) if valid else "",
            span_id=trace.format_span_id(context.span_id) if valid else "",
            request_suffix=f" [{request_id}]" if request_id else "",
        )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, exception."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        if not hasattr(record, "trace_id"):
            ContextFilter().filter(record)
        out: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def setup_logging(log_format: LogFormat = "text", service: str = "") -> None:
    """Root logging at ``QS_LOG_LEVEL`` (default INFO) in ``log_format``.

    In ``json`` format vLLM's loggers (in this process and in the engine processes it
    starts) are sent through the same formatter via ``VLLM_LOGGING_CONFIG_PATH``.
    """
    level = os.environ.get("QS_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
        _route_vllm_logs(level, service)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("opentelemetry.trace").addFilter(_ProviderOverrideFilter())


def _route_vllm_logs(level: str, service: str) -> None:
    """Point vLLM's logging config (read when vLLM is imported) at the JSON formatter."""
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "service": service}},
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["context"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {"vllm": {"handlers": ["json"], "level": level, "propagate": False}},
    }
    path = os.path.join(tempfile.gettempdir(), f"qwen-serve-vllm-logging-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    atexit.register(_remove_quietly, path)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class _ProviderOverrideFilter(logging.Filter):
    """Hides the API's warning when vLLM tries to install its own tracer provider.

    vLLM's ``init_tracer`` calls ``set_tracer_provider``; the API keeps the first
    provider (ours), which is what we want, and warns. The worker logs the outcome.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop only that warning."""
        return "Overriding of current TracerProvider is not allowed" not in record.getMessage()


# ------------------------------------------------------------------ traces


@dataclass(frozen=True)
class TracingConfig:
    """What the OTEL_* variables ask for."""

    exporters: tuple[str, ...]
    protocol: str
    endpoint: str
    """The OTLP traces endpoint (also handed to vLLM); empty without the otlp exporter."""


def tracing_config(env: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The tracing the environment asks for; None when tracing is off.

    ValueError for an exporter or protocol this service cannot use.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        names = ["otlp"] if endpoint else []
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: unsupported {unknown} (use {', '.join(EXPORTERS)})"
        )
    if not names:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported (use {', '.join(PROTOCOLS)})"
        )
    return TracingConfig(
        tuple(names), protocol, _traces_endpoint(env, protocol) if "otlp" in names else ""
    )


def _traces_endpoint(env: Mapping[str, str], protocol: str) -> str:
    """The traces endpoint the OTLP exporter will use (the spec's derivation)."""
    specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINTS[protocol]
    if protocol == "http/protobuf":
        return base.rstrip("/") + "/v1/traces"
    return base


class QuietSampler(Sampler):
    """Keeps tracing to requests: drops parentless client spans and blocking polls.

    Wraps the sampler ``OTEL_TRACES_SAMPLER`` chose, which decides everything else.
    """

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """DROP a client span outside a trace or a blocking read; else the delegate decides."""
        if kind == SpanKind.CLIENT:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid or name.upper() in BLOCKING_COMMANDS:
                return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """Name shown by the SDK."""
        return f"QuietSampler{{{self.delegate.get_description()}}}"


def setup_tracing(
    service: str, instance_id: str = "", env: Mapping[str, str] | None = None
) -> TracingConfig | None:
    """Install the global tracer provider the environment asks for; None when off."""
    config = tracing_config(env)
    if config is None:
        return None
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace import sampling as sdk_sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    defaults: dict[str, str] = {"service.name": service}
    if instance_id:
        defaults["service.instance.id"] = instance_id
    resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
    # The SDK's own parser of OTEL_TRACES_SAMPLER / _ARG.
    sampler = QuietSampler(sdk_sampling._get_from_env_or_default())
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in _exporters(config):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _instrument_redis()
    logger.info(
        "tracing on: %s%s, sampler %s",
        "+".join(config.exporters),
        f" ({config.protocol} to {config.endpoint})" if config.endpoint else "",
        sampler.get_description(),
    )
    return config


def _exporters(config: TracingConfig) -> list[Any]:
    exporters: list[Any] = []
    if "console" in config.exporters:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporters.append(ConsoleSpanExporter())
    if "otlp" in config.exporters:
        if config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        exporters.append(OTLPSpanExporter())
    return exporters


def _instrument_redis() -> None:
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:
        logger.info("opentelemetry-instrumentation-redis is not installed: Redis calls untraced")
        return
    instrumentor = RedisInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def tracer(name: str) -> trace.Tracer:
    """A tracer of the global provider (a no-op one while tracing is off)."""
    return trace.get_tracer(name)


def setup(log_format: LogFormat, service: str, instance_id: str = "") -> TracingConfig | None:
    """Logs, then traces, for one process; returns the tracing config (None: off)."""
    setup_logging(log_format, service)
    return setup_tracing(service, instance_id)


# ------------------------------------------------------------------ GenAI attributes

PROVIDER = "vllm"
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_ABORT: "abort",
}
_SAMPLING_ATTRIBUTES = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("top_k", "gen_ai.request.top_k"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("seed", "gen_ai.request.seed"),
    ("n", "gen_ai.request.choice.count"),
)
Request = pb.ChatRequest | pb.GenerateRequest


def operation_name(request: Request) -> str:
    """``gen_ai.operation.name`` of a request: chat or text_completion."""
    return "chat" if isinstance(request, pb.ChatRequest) else "text_completion"


def request_attributes(request: Request) -> dict[str, AttributeValue]:
    """GenAI semantic-convention attributes of a request (no content)."""
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation_name(request),
        "gen_ai.provider.name": PROVIDER,
    }
    if request.model:
        attributes["gen_ai.request.model"] = request.model
    sampling = request.sampling
    for name, key in _SAMPLING_ATTRIBUTES:
        if sampling.HasField(name):
            value = getattr(sampling, name)
            attributes[key] = round(value, 6) if isinstance(value, float) else value
    if sampling.stop:
        attributes["gen_ai.request.stop_sequences"] = list(sampling.stop)
    return attributes


def usage_attributes(usage: pb.Usage) -> dict[str, AttributeValue]:
    """``gen_ai.usage.*`` of a Usage event."""
    return {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
    }


def finish_reason(finished: pb.Finished) -> str:
    """The semantic-convention name of a finish reason."""
    return FINISH_REASONS.get(finished.reason, "unknown")
