"""The one way into the queue, shared by every door of the router.

The gRPC servicer and the OpenAI-compatible HTTP API both turn a call into a
``ChatRequest`` or ``GenerateRequest`` and hand it here with the caller's
tenant, time left and trace context: validation, admission and the model's
limits (one call, :func:`admit`), the job and the dispatcher's stream are the
same for both. :func:`open_stream` returns once the job is in the queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import UNAVAILABLE, RequestError
from router import errors, jobs, validation
from router.dispatcher import Dispatcher, JobStream

logger = logging.getLogger(__name__)

Request = pb.ChatRequest | pb.GenerateRequest


class EventStream(Protocol):
    """A request's events as a door hands them out; closing it early aborts the request."""

    def __aiter__(self) -> AsyncIterator[pb.ChatEvent]:
        """The events, in order."""
        ...

    async def __anext__(self) -> pb.ChatEvent:
        """The next event."""
        ...

    async def aclose(self) -> None:
        """Leave the stream (aborting the request unless it has ended)."""


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


def admit(dispatcher: Dispatcher, request: Request, tenant: str) -> None:
    """Whether ``request`` of ``tenant`` can be taken now: validation, this router's
    admission and the served model's limits, in that order (RequestError if not)."""
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


async def open_stream(
    dispatcher: Dispatcher,
    request: Request,
    *,
    tenant: str,
    time_remaining_s: float | None,
    metadata: Iterable[tuple[str, str | bytes]],
) -> JobStream:
    """Admit ``request`` (:func:`admit`), build its job and queue it; its events.

    The job is in the queue when this returns (RequestError if refused); the caller
    closes the stream. ``metadata`` is the call's headers (the trace context is taken
    from it); ``time_remaining_s`` its deadline, None for none.
    """
    admit(dispatcher, request, tenant)
    job = jobs.make_job(
        request,
        router_id=dispatcher.queue.router_id,
        reply_stream=dispatcher.queue.reply_stream,
        deadline_unix_ms=jobs.deadline_ms(time_remaining_s),
        trace=jobs.trace_context(metadata),
        tenant=tenant,
    )
    return await dispatcher.open(job)


async def accepted(stream: EventStream) -> pb.ChatEvent:
    """The stream's first event (Started); RequestError if it failed before acceptance.

    The stream is closed if this raises (an Error event, a cancellation).
    """
    try:
        first = await anext(stream)
        if first.HasField("error"):
            raise errors.from_event(first)
    except BaseException:
        await stream.aclose()
        raise
    return first
