"""The gRPC edge: qwen_serve.api.v1.Inference on top of the Dispatcher.

Each RPC authenticates (API key → tenant), then hands the request to the shared
intake (router/intake.py: validation, admission and the model's limits in one
call, then the job, queued before the RPC waits for anything) and relays events.
A failure before the worker's Started event becomes a gRPC status; after it, the
Error event is the stream's last event and the call then ends with the same
failure as its status (so meshes count it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.errors import UNAVAILABLE, RequestError
from router import errors, intake, observability, validation
from router.dispatcher import Dispatcher, JobStream
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
        async for event in self._serve(request, context):
            yield event

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        """Stream a raw-prompt completion."""
        async for event in self._serve(request, context):
            yield event

    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        """Abort a request by id; idempotent. Only the request's own tenant can abort it."""
        try:
            tenant = self.auth.tenant(context.invocation_metadata())
            validation.check_request_id(request.request_id)
            found = await self.dispatcher.abort(request.request_id, tenant)
        except RequestError as exc:
            await errors.abort(context, exc)
        except ConnectionError as exc:
            await errors.abort(context, RequestError(UNAVAILABLE, "", str(exc), retryable=True))
        return pb.AbortResponse(found=found)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        """Describe the served model."""
        try:
            self.auth.tenant(context.invocation_metadata())
            info = intake.served_model(self.dispatcher)
            validation.check_against_model(request.model, pb.SamplingParams(), 0, info)
        except RequestError as exc:
            await errors.abort(context, exc)
        return info

    async def _serve(
        self, request: pb.ChatRequest | pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        """Relay one request's events; a failure becomes the call's status.

        Before Started the failure is only the status. After it, the Error event is
        relayed first, then the call ends with its code and details. Events go
        straight from the dispatcher's channel to gRPC (one generator in between),
        each observed for the call's span and metrics. Leaving early (the client
        went away, the deadline passed) closes the stream, which aborts the request.
        """
        try:
            stream = await self._open(request, context)
            first = await intake.accepted(stream)  # closes the stream if it raises
        except RequestError as exc:
            await errors.abort(context, exc)
            return
        failure = None
        async with contextlib.aclosing(stream):  # entered at once: nothing awaited since
            observe = observability.observer()
            observe(first)
            yield first
            async for event in stream:
                observe(event)
                yield event
                if event.HasField("error"):  # terminal: the stream ends after it
                    failure = errors.from_event(event)
        if failure is not None:
            await errors.abort(context, failure)

    async def _open(
        self, request: pb.ChatRequest | pb.GenerateRequest, context: Context
    ) -> JobStream:
        """Authenticate, then the shared intake: the job is queued when this returns
        (RequestError if any of it fails)."""
        metadata = context.invocation_metadata() or ()
        return await intake.open_stream(
            self.dispatcher,
            request,
            tenant=self.auth.tenant(metadata),
            time_remaining_s=context.time_remaining(),
            metadata=metadata,
        )
