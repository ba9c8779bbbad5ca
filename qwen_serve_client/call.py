"""What the sync and async streams share: deadline, attempts, retry decisions, folding.

One :class:`CallState` lives for one logical call (all its attempts). The
deadline is absolute: retries spend the same budget rather than extend it.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client.connection import RetryPolicy
from qwen_serve_client.errors import DeadlineExceeded, QwenServeError, from_rpc_error
from qwen_serve_client.events import Event, Started, from_proto
from qwen_serve_client.result import Accumulator


class CallState:
    """Attempts, deadline and received events of one Chat or Generate call."""

    def __init__(self, retry: RetryPolicy, timeout: float | None, target: str) -> None:
        self.retry = retry
        self.target = target
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.attempt = 0
        self.received = False
        self.cancelled = False
        self.accumulator = Accumulator()
        self.started: Started | None = None

    def next_attempt(self) -> float | None:
        """Count an attempt; the seconds left for it (None: no deadline)."""
        self.attempt += 1
        return self.remaining()

    def remaining(self) -> float | None:
        """Seconds left before the deadline; raises DeadlineExceeded when none are."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                "deadline exceeded before the call could be sent",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
                target=self.target,
            )
        return left

    def on_message(self, message: pb.ChatEvent) -> Event:
        """The typed event of a received message, folded into the result."""
        event = from_proto(message)
        self.received = True
        if isinstance(event, Started):
            self.started = event
        self.accumulator.add(event)
        return event

    def on_error(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before retrying after ``exc``; raises the client error if no retry.

        A call is retried only while no event has arrived (the request was not
        accepted, nothing reached the caller) and the deadline leaves room.
        """
        error = from_rpc_error(exc, self.target)
        if self.received or self.cancelled or not self.retry.should_retry(error.code, self.attempt):
            raise error from exc
        delay = self.retry.delay(self.attempt, error.retry_after)
        left = self.deadline - time.monotonic() if self.deadline is not None else None
        if left is not None and left <= delay:
            raise error from exc
        return delay


def reported(exc: Any, state: CallState) -> bool:
    """Whether ``exc`` is the status that ends a stream after its Error event.

    After acceptance the server sends the typed Error event, then ends the call
    with the same code (so proxies count the failure): the event already told
    the caller, in ``result.error``, so iteration ends quietly.
    """
    error = state.accumulator.result.error
    code = exc.code() if hasattr(exc, "code") else None
    return error is not None and code == error.status


def unary_error(exc: grpc.RpcError, state: CallState) -> tuple[float, QwenServeError | None]:
    """For idempotent unary calls: (delay, None) to retry, or (0, error) to raise."""
    try:
        return state.on_error(exc), None
    except QwenServeError as error:
        return 0.0, error


def is_local_cancel(exc: Any, state: CallState) -> bool:
    """Whether ``exc`` is the CANCELLED status of a cancel this client asked for."""
    code = exc.code() if hasattr(exc, "code") else None
    return state.cancelled and code == grpc.StatusCode.CANCELLED
