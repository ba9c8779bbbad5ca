"""The blocking client: the same API as :class:`~qwen_serve_client.AsyncClient`, without await.

::

    with Client("127.0.0.1:50051") as client:
        result = client.chat("Hello", think=False, max_tokens=32).collect()
        print(result.content, result.usage)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_client.call import CallState, is_local_cancel, reported, unary_error
from qwen_serve_client.connection import Connection, ConnectionOptions
from qwen_serve_client.content import MessageLike
from qwen_serve_client.events import Event, Started
from qwen_serve_client.requests import ChatArgs, GenerateArgs, chat_request, generate_request
from qwen_serve_client.result import ChatResult

Metadata = Sequence[tuple[str, str]]


class ChatStream:
    """A Chat or Generate call: iterate it for typed events (see AsyncChatStream)."""

    def __init__(
        self, start: Callable[[float | None], Any], state: CallState, abort: Callable[[str], bool]
    ) -> None:
        self._start = start
        self._state = state
        self._abort = abort
        self._call: Any = None
        self._events = self._run()

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def __next__(self) -> Event:
        return next(self._events)

    @property
    def result(self) -> ChatResult:
        """Everything received so far, accumulated."""
        return self._state.accumulator.result

    @property
    def started(self) -> Started | None:
        """The Started event, once it arrived."""
        return self._state.started

    @property
    def attempts(self) -> int:
        """Calls made so far (more than 1 when a failure before any event was retried)."""
        return self._state.attempt

    def _run(self) -> Iterator[Event]:
        state = self._state
        while True:
            self._call = self._start(state.next_attempt())
            try:
                for message in self._call:
                    yield state.on_message(message)
                return
            except grpc.RpcError as exc:
                if is_local_cancel(exc, state) or reported(exc, state):
                    return
                time.sleep(state.on_error(exc))

    def collect(self, check: bool = True) -> ChatResult:
        """Read the rest of the stream; the whole result (``check``: raise StreamFailed)."""
        for _ in self:
            pass
        return self.result.raise_for_error() if check else self.result

    def cancel(self) -> None:
        """Cancel the call; iteration ends quietly (the server aborts the request)."""
        self._state.cancelled = True
        if self._call is not None:
            self._call.cancel()

    def abort(self) -> bool:
        """Ask the server to abort this request (after Started); whether it was running."""
        if self._state.started is None:
            raise RuntimeError("abort() needs the Started event; use cancel() before it")
        return self._abort(self._state.started.request_id)


class Client:
    """Blocking client of ``qwen_serve.api.v1.Inference`` plus grpc.health.v1.

    Keyword options are those of :class:`~qwen_serve_client.Connection`.
    """

    def __init__(self, target: str = "", **options: Unpack[ConnectionOptions]) -> None:
        self.connection = Connection(target=target, **options)
        self.target = self.connection.resolved_target()
        self._channel = self.connection.sync_channel()
        self._stub = serve_pb2_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (open streams are cancelled)."""
        self._channel.close()

    def chat(
        self,
        messages: MessageLike | Sequence[MessageLike],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Unpack[ChatArgs],
    ) -> ChatStream:
        """Stream a chat reply; keywords as :func:`~qwen_serve_client.chat_request`."""
        return self.stream(chat_request(messages, **kwargs), timeout=timeout, metadata=metadata)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        **kwargs: Unpack[GenerateArgs],
    ) -> ChatStream:
        """Stream a raw-prompt completion (text or token ids)."""
        return self.stream(generate_request(prompt, **kwargs), timeout=timeout, metadata=metadata)

    def stream(
        self,
        request: pb.ChatRequest | pb.GenerateRequest,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> ChatStream:
        """Stream a prepared request. ``timeout`` (s) is the whole call's deadline."""
        method = self._stub.Chat if isinstance(request, pb.ChatRequest) else self._stub.Generate
        md = self.connection.call_metadata(tuple(metadata))
        timeout = timeout if timeout is not None else self.connection.timeout
        state = CallState(self.connection.retry, timeout, self.target)
        return ChatStream(
            lambda left: method(request, timeout=left, metadata=md), state, self.abort
        )

    def abort(self, request_id: str, *, timeout: float | None = 30.0) -> bool:
        """Abort a request by its id (idempotent); whether it was running."""
        reply = self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)
        return bool(reply.found)

    def model_info(self, model: str = "", *, timeout: float | None = 30.0) -> pb.ModelInfo:
        """The served model: name, limits, capabilities and live workers."""
        request = pb.GetModelInfoRequest(model=model)
        info: pb.ModelInfo = self._unary(self._stub.GetModelInfo, request, timeout)
        return info

    def health(self, service: str = "", *, timeout: float | None = 10.0) -> str:
        """grpc.health.v1 status name: "" is readiness, "liveness" is the process being up."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        state = CallState(self.connection.retry, timeout, self.target)
        while True:
            left = state.next_attempt()
            try:
                return method(request, timeout=left, metadata=self.connection.call_metadata())
            except grpc.RpcError as exc:
                delay, error = unary_error(exc, state)
                if error is not None:
                    raise error from exc
                time.sleep(delay)
