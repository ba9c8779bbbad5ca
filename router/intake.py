"""The one way into the queue, shared by every door of the router.

The gRPC servicer and the OpenAI-compatible HTTP API both turn a call into a
``ChatRequest`` or ``GenerateRequest`` and hand it here with the caller's
tenant, time left and trace context: validation, admission, the model's
limits, the job and the dispatcher's stream are the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import UNAVAILABLE, RequestError
from router import errors, jobs, validation
from router.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

Request = pb.ChatRequest | pb.GenerateRequest


def served_model(dispatcher: Dispatcher) -> pb.ModelInfo:
    """The served model as the workers report it; UNAVAILABLE when none is live."""
    info = dispatcher.view.model()
    if info is None:
        raise RequestError(UNAVAILABLE, "", "no worker is available", retryable=True)
    return info


def image_count(request: Request) -> int:
    """Images the request carries (what ``max_images_per_prompt`` limits)."""
    if isinstance(request, pb.ChatRequest):
        return validation.count_images(request.messages)
    return len(request.images)


def open_stream(
    dispatcher: Dispatcher,
    request: Request,
    *,
    tenant: str,
    time_remaining_s: float | None,
    metadata: Iterable[tuple[str, str | bytes]],
) -> AsyncGenerator[pb.ChatEvent, None]:
    """Validate, admit and queue ``request``; its events (RequestError if refused).

    ``metadata`` is the call's headers (the trace context is taken from it);
    ``time_remaining_s`` its deadline, None for none.
    """
    if isinstance(request, pb.ChatRequest):
        validation.check_chat(request)
    else:
        validation.check_generate(request)
    dispatcher.admit(tenant)
    validation.check_against_model(
        request.model,
        request.sampling,
        image_count(request),
        served_model(dispatcher),
        "messages" if isinstance(request, pb.ChatRequest) else "images",
    )
    job = jobs.make_job(
        request,
        router_id=dispatcher.queue.router_id,
        reply_stream=dispatcher.queue.reply_stream,
        deadline_unix_ms=jobs.deadline_ms(time_remaining_s),
        trace=jobs.trace_context(metadata),
        tenant=tenant,
    )
    return dispatcher.stream(job)


async def accepted(stream: AsyncGenerator[pb.ChatEvent, None]) -> pb.ChatEvent:
    """The stream's first event (Started); RequestError if it failed before acceptance."""
    first = await anext(stream)
    if first.HasField("error"):
        await stream.aclose()
        raise errors.from_event(first)
    return first
