"""Pure conversions from an accepted gRPC call to a queue Job."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import now_ms
from qwen_serve.queue.codec import Job

TRACE_HEADERS = ("traceparent", "tracestate")


def new_request_id() -> str:
    """An unguessable request id (128 random bits, URL-safe)."""
    return "req_" + secrets.token_urlsafe(16)


def deadline_ms(time_remaining_s: float | None) -> int:
    """Absolute deadline in epoch ms from gRPC's time remaining; 0 when none."""
    if time_remaining_s is None:
        return 0
    return now_ms() + int(time_remaining_s * 1000)


def trace_context(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The W3C trace-context headers of the call's metadata."""
    return {k: v for k, v in metadata if k in TRACE_HEADERS and isinstance(v, str)}


def make_job(
    request: pb.ChatRequest | pb.GenerateRequest,
    *,
    router_id: str,
    reply_stream: str,
    deadline_unix_ms: int,
    trace: dict[str, str],
    tenant: str = "",
) -> Job:
    """The Job that carries ``request`` to a worker."""
    job = Job(
        request_id=new_request_id(),
        router_id=router_id,
        reply_stream=reply_stream,
        deadline_unix_ms=deadline_unix_ms,
        trace_context=trace,
        enqueued_unix_ms=now_ms(),
        tenant=tenant,
    )
    if isinstance(request, pb.ChatRequest):
        job.chat.CopyFrom(request)
    else:
        job.generate.CopyFrom(request)
    return job


def continuation_job(job: Job, delivered: list[int]) -> Job:
    """The same request, continued after the tokens its client already received."""
    again = Job()
    again.CopyFrom(job)
    again.attempt = job.attempt + 1
    again.enqueued_unix_ms = now_ms()
    del again.continuation_token_ids[:]
    again.continuation_token_ids.extend(delivered)
    return again


def can_continue(job: Job) -> bool:
    """Whether a lost stream of ``job`` can be continued elsewhere (single choice only)."""
    request = job.chat if job.HasField("chat") else job.generate
    return not request.sampling.HasField("n") or request.sampling.n <= 1
