"""Coalescing writer of events to the routers' reply streams.

Events are buffered per request attempt; consecutive deltas of one choice
merge into one. A single task writes everything buffered in one pipelined
round trip (one stream entry per router), starting at most every
``window_s``: an event that arrives after a quiet spell is written at once
(after letting the other requests of the same engine step add theirs), while
under load the events of a whole window share one write. So an idle worker
adds no delay, and a busy one makes few Redis calls per token.

Every Reply carries its attempt (the router's fence) and a sequence number
per attempt, kept across retries: a write retried after an ambiguous
failure, or a stream read twice, is dropped by the router, and a gap shows
lost output. A job is acknowledged in the same round trip that writes its
last events, after them, never before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import merge_into
from qwen_serve.queue.broker import AttemptRef, QueueUnavailable, WorkerQueue
from qwen_serve.queue.codec import Reply

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 0.2

Key = tuple[str, int]
"""(request id, attempt)."""


@dataclass
class _Pending:
    stream: str
    events: list[pb.ChatEvent] = field(default_factory=list)


@dataclass
class _End:
    """A job to acknowledge once the events put before it are written."""

    key: Key | None  # its attempt's sequence counter is dropped then
    leased: AttemptRef | None  # the lease to mark done
    written: Callable[[], None]


@dataclass
class _Batch:
    replies: list[tuple[str, Reply]]
    ends: dict[bytes, _End]
    done: list[Key]


class ReplyWriter:
    """Buffers events per request attempt and writes them in batches."""

    def __init__(self, queue: WorkerQueue, worker_id: str, window_s: float) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.window_s = window_s
        self._buffer: dict[Key, _Pending] = {}
        self._ends: dict[bytes, _End] = {}
        self._seq: dict[Key, int] = {}
        self._lost_replies: dict[Key, Reply] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failing_since: float | None = None
        self._discard = False
        self._last_flush = 0.0

    def put(self, request_id: str, stream: str, event: pb.ChatEvent, attempt: int = 0) -> None:
        """Queue one event of ``request_id``'s attempt ``attempt`` for reply stream ``stream``."""
        pending = self._buffer.setdefault((request_id, attempt), _Pending(stream))
        if not (pending.events and merge_into(pending.events[-1], event)):
            pending.events.append(event)
        self._kick()

    def end(
        self,
        key: Key | None,
        entry_id: bytes,
        leased: AttemptRef | None,
        written: Callable[[], None] = lambda: None,
    ) -> None:
        """Acknowledge job entry ``entry_id`` once what was put before is written, in the
        same round trip (marking ``leased`` done); then call ``written``.

        ``key``: the attempt this worker streamed, whose sequence counter can go.
        """
        self._ends[entry_id] = _End(key, leased, written)
        self._kick()

    def lost(self, key: Key, stream: str) -> None:
        """Tell the router this attempt ends without a terminal event (continue it elsewhere)."""
        self.drop(key)
        reply = Reply(request_id=key[0], worker_id=self.worker_id, attempt=key[1])
        reply.attempt_lost = True
        self._buffer[key] = _Pending(stream)
        self._lost_replies[key] = reply
        self._kick()

    def drop(self, key: Key) -> None:
        """Forget what is buffered for an attempt that is no longer this worker's."""
        self._buffer.pop(key, None)
        self._lost_replies.pop(key, None)
        self._seq.pop(key, None)

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Write buffered events until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            # Sleep(0) lets the requests woken by the same engine step put theirs first.
            await asyncio.sleep(max(0.0, self._last_flush + self.window_s - loop.time()))
            self._last_flush = loop.time()
            self._wake.clear()
            await self._send(self._take())
            if not (self._buffer or self._ends):
                self._idle.set()

    def _take(self) -> _Batch:
        buffer, self._buffer = self._buffer, {}
        ends, self._ends = self._ends, {}
        lost, self._lost_replies = self._lost_replies, {}
        replies = []
        for key, pending in buffer.items():
            reply = lost.get(key) or self._sequenced(key, pending.events)
            replies.append((pending.stream, reply))
        # Nothing more is put for these: their counters can go once written.
        done = [end.key for end in ends.values() if end.key is not None] + list(lost)
        return _Batch(replies, ends, done)

    def _sequenced(self, key: Key, events: list[pb.ChatEvent]) -> Reply:
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        return Reply(
            request_id=key[0], events=events, worker_id=self.worker_id, attempt=key[1], seq=seq
        )

    def failing_for(self) -> float:
        """Seconds the current write has been failing (0 when writes succeed)."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    def discard(self) -> None:
        """Drop everything buffered and the write being retried (their readers are gone)."""
        self._buffer.clear()
        self._ends.clear()
        self._lost_replies.clear()
        self._seq.clear()
        self._discard = True

    async def flush(self) -> None:
        """Wait until everything put so far is written."""
        await self._idle.wait()

    async def _send(self, batch: _Batch) -> None:
        self._discard = False
        while not self._discard:
            try:
                ends = [(entry_id, end.leased) for entry_id, end in batch.ends.items()]
                await self.queue.send(batch.replies, ends)
                self._failing_since = None
                for key in batch.done:
                    self._seq.pop(key, None)
                for end in batch.ends.values():
                    end.written()
                return
            except QueueUnavailable as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.warning("cannot write replies, retrying: %s", exc)
                await asyncio.sleep(RETRY_DELAY_S)
        logger.warning("discarded %d undeliverable replies", len(batch.replies))
        self._failing_since = None
