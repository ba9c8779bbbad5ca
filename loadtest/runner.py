"""Runs the calls: ``-c`` workers over ``--connections`` channels, paced by ``-r``.

Each worker makes one call at a time until ``-n`` calls have started or the
``-z`` duration has passed; calls in flight when the duration ends are let
finish within their deadline (ghz cancels them). Every call becomes a
:class:`CallResult` with its latency, status and, for streams, the arrival
time of each token.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from loadtest.options import Options
from loadtest.reflect import Method
from loadtest.tokens import Counter, counter_for

STATUS_NAMES = {
    code.value[0]: "".join(part.capitalize() for part in code.name.split("_"))
    for code in grpc.StatusCode
}
STATUS_NAMES[0] = "OK"
STATUS_NAMES[1] = "Canceled"  # Go spelling, as ghz prints it


def status_name(code: int) -> str:
    """ghz's (Go's) name of a gRPC status code, e.g. ``ResourceExhausted``."""
    return STATUS_NAMES.get(code, f"Code({code})")


@dataclass
class CallResult:
    """One call as the report sees it."""

    start_unix_ns: int
    latency_ns: int = 0
    status: str = "OK"
    error: str = ""
    ttft_ns: int | None = None
    tokens: int = 0
    messages: int = 0
    gaps_ns: list[int] = field(default_factory=list)
    """Inter-token latency samples: a gap over k tokens counts k times gap/k."""
    first_token_ns: int = 0
    last_token_ns: int = 0
    delays_ns: list[int] = field(default_factory=list)
    """Emit-to-receive delay per stamped token (``--stamped-tokens``)."""

    def add_tokens(self, tokens: int, now: int, start: int) -> None:
        """Record ``tokens`` arriving at ``now`` (TTFT on the first, gaps after)."""
        if self.ttft_ns is None:
            self.ttft_ns = now - start
            self.first_token_ns = now
        else:
            self.gaps_ns.extend([(now - self.last_token_ns) // tokens] * tokens)
        self.last_token_ns = now
        self.tokens += tokens


TIMELINE_BIN_NS = 100_000_000


@dataclass
class RunResult:
    """Every call plus the wall time and why the run ended."""

    calls: list[CallResult]
    total_ns: int
    end_reason: str = "normal"
    timeline: list[int] = field(default_factory=list)
    """Tokens received per TIMELINE_BIN_NS since the start of the run."""


def add_to_timeline(timeline: list[int], offset_ns: int, tokens: int) -> None:
    """Count ``tokens`` received ``offset_ns`` after the start in the timeline's bin."""
    index = offset_ns // TIMELINE_BIN_NS
    if index >= len(timeline):
        timeline.extend([0] * (index + 1 - len(timeline)))
    timeline[index] += tokens


class _Pacer:
    """Shared start-time slots for ``-r`` requests per second."""

    def __init__(self, rps: float) -> None:
        self.interval = 1.0 / rps if rps > 0 else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self.next)
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class Runner:
    """One load test against one resolved method."""

    def __init__(
        self,
        options: Options,
        method: Method,
        on_result: Callable[[CallResult], None] | None = None,
    ) -> None:
        self.options = options
        self.method = method
        self.on_result = on_result or (lambda _r: None)
        self.requests: Sequence[Message] = [method.request(d) for d in options.data]
        self.metadata = tuple(options.metadata.items())
        self.count: Counter = counter_for(
            method.response_cls.DESCRIPTOR.full_name, options.stamped_tokens
        )
        self._issued = itertools.count()
        self._deadline = 0.0
        self._results: list[CallResult] = []
        self._started_ns = time.monotonic_ns()
        self._timeline: list[int] = []

    async def run(self) -> RunResult:
        """Run every call; returns when the last one has ended."""
        opts = self.options
        workers = opts.concurrency if opts.duration_s else min(opts.concurrency, opts.total)
        channels = [self._channel() for _ in range(opts.connections)]
        started = self._started_ns = time.monotonic_ns()
        self._deadline = time.monotonic() + opts.duration_s if opts.duration_s else 0.0
        pacer = _Pacer(opts.rps)
        try:
            await asyncio.gather(
                *(self._worker(channels[i % len(channels)], pacer) for i in range(workers))
            )
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        total = time.monotonic_ns() - started
        reason = "timeout" if opts.duration_s else "normal"
        return RunResult(self._results, total, reason, self._timeline)

    def _channel(self) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.options.insecure:
            return grpc.aio.insecure_channel(self.options.host, options=options)
        return grpc.aio.secure_channel(
            self.options.host, grpc.ssl_channel_credentials(), options=options
        )

    def _next_index(self) -> int | None:
        if self._deadline and time.monotonic() >= self._deadline:
            return None
        index = next(self._issued)
        if not self._deadline and index >= self.options.total:
            return None
        return index

    async def _worker(self, channel: grpc.aio.Channel, pacer: _Pacer) -> None:
        path, req_cls, resp_cls = (
            self.method.path,
            self.method.request_cls,
            self.method.response_cls,
        )
        kwargs: dict[str, Any] = {
            "request_serializer": req_cls.SerializeToString,
            "response_deserializer": resp_cls.FromString,
        }
        if self.method.server_streaming:
            call_fn: Any = channel.unary_stream(path, **kwargs)
        else:
            call_fn = channel.unary_unary(path, **kwargs)
        while (index := self._next_index()) is not None:
            await pacer.wait()
            request = self.requests[index % len(self.requests)]
            result = await self._call(call_fn, request)
            self._results.append(result)
            self.on_result(result)

    async def _call(self, call_fn: Any, request: Message) -> CallResult:
        result = CallResult(start_unix_ns=time.time_ns())
        timeout = self.options.timeout_s or None
        start = time.monotonic_ns()
        try:
            call = call_fn(request, timeout=timeout, metadata=self.metadata)
            if self.method.server_streaming:
                async for message in call:
                    self._on_message(result, start, message)
            else:
                self._on_message(result, start, await call)
        except grpc.aio.AioRpcError as exc:
            result.status = status_name(exc.code().value[0])
            result.error = f"rpc error: code = {result.status} desc = {exc.details()}"
        result.latency_ns = time.monotonic_ns() - start
        return result

    def _on_message(self, result: CallResult, start: int, message: Message) -> None:
        now = time.monotonic_ns()
        result.messages += 1
        counted = self.count(message)
        if counted.error_code:
            result.status = status_name(counted.error_code)
            result.error = (
                f"stream error event: code = {result.status} desc = {counted.error_message}"
            )
            return
        if not counted.tokens:
            return
        result.add_tokens(counted.tokens, now, start)
        add_to_timeline(self._timeline, now - self._started_ns, counted.tokens)
        if counted.stamps_ns:
            result.delays_ns.extend(now - stamp for stamp in counted.stamps_ns)
