"""The gRPC edge: qwen_serve.api.v1.Inference on top of the Dispatcher.

Each RPC authenticates (API key → tenant), validates, admits, builds a Job
and relays events. A failure before the worker's Started event becomes a
gRPC status; after it, the worker's Error event is the stream's last event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeAlias

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.errors import UNAVAILABLE, RequestError
from router import errors, jobs, observability, validation
from router.dispatcher import Dispatcher
from router.security import Authenticator

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext


class InferenceServicer(serve_pb2_grpc.InferenceServicer):
    """Chat, Generate, Abort and GetModelInfo."""

    def __init__(self, dispatcher: Dispatcher, auth: Authenticator | None = None) -> None:
        self.dispatcher = dispatcher
        self.auth = auth or Authenticator(())

    async def Chat(self, request: pb.ChatRequest, context: Context) -> AsyncIterator[pb.ChatEvent]:
        """Stream a chat reply."""
        images = validation.count_images(request.messages)
        async for event in self._serve(request, images, context):
            yield event

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        """Stream a raw-prompt completion."""
        async for event in self._serve(request, len(request.images), context):
            yield event

    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        """Abort a request by id; idempotent."""
        try:
            self.auth.tenant(context.invocation_metadata())
            validation.check_request_id(request.request_id)
            found = await self.dispatcher.abort(request.request_id)
        except RequestError as exc:
            await errors.abort(context, exc)
        except ConnectionError as exc:
            await errors.abort(context, RequestError(UNAVAILABLE, "", str(exc), retryable=True))
        return pb.AbortResponse(found=found)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        """Describe the served model."""
        try:
            self.auth.tenant(context.invocation_metadata())
            info = self._model()
            validation.check_against_model(request.model, pb.SamplingParams(), 0, info)
        except RequestError as exc:
            await errors.abort(context, exc)
        return info

    async def _serve(
        self, request: pb.ChatRequest | pb.GenerateRequest, images: int, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        """Relay one request's events; a failure before Started becomes the call's status.

        Events go straight from the dispatcher's channel to gRPC (one generator in
        between), each observed for the call's span and metrics.
        """
        try:
            stream = self._open(request, images, context)
            first = await anext(stream)
            if first.HasField("error"):
                await stream.aclose()
                raise errors.from_event(first)
        except RequestError as exc:
            await errors.abort(context, exc)
            return
        observe = observability.observer()
        observe(first)
        yield first
        async for event in stream:
            observe(event)
            yield event

    def _open(
        self, request: pb.ChatRequest | pb.GenerateRequest, images: int, context: Context
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        """Authenticate, validate, admit and queue (RequestError if any of it fails)."""
        tenant = self.auth.tenant(context.invocation_metadata())
        if isinstance(request, pb.ChatRequest):
            validation.check_chat(request)
        else:
            validation.check_generate(request)
        self.dispatcher.admit(tenant)
        validation.check_against_model(request.model, request.sampling, images, self._model())
        job = jobs.make_job(
            request,
            router_id=self.dispatcher.queue.router_id,
            reply_stream=self.dispatcher.queue.reply_stream,
            deadline_unix_ms=jobs.deadline_ms(context.time_remaining()),
            trace=jobs.trace_context(context.invocation_metadata() or ()),
            tenant=tenant,
        )
        return self.dispatcher.stream(job)

    def _model(self) -> pb.ModelInfo:
        info = self.dispatcher.view.model()
        if info is None:
            raise RequestError(UNAVAILABLE, "", "no worker is available", retryable=True)
        return info
