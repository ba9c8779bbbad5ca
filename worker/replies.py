"""Coalescing writer of events to the routers' reply streams.

Events are buffered per request; consecutive deltas of one choice merge
into one. A single task writes everything buffered in one pipelined round
trip (one stream entry per router), starting at most every ``window_s``: an
event that arrives after a quiet spell is written at once (after letting the
other requests of the same engine step add theirs), while under load the
events of a whole window share one write. So an idle worker adds no delay,
and a busy one makes few Redis calls per token.

A Started event is written together with the request's started marker, in
the same pipeline and before it: routers rely on the marker once they see
Started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import merge_into
from qwen_serve.queue.broker import QueueUnavailable, WorkerQueue
from qwen_serve.queue.codec import Reply

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 0.2


@dataclass
class _Pending:
    stream: str
    events: list[pb.ChatEvent] = field(default_factory=list)

    @property
    def starts(self) -> bool:
        """Whether this batch opens the request's stream (Started is always put first)."""
        return self.events[0].HasField("started")


class ReplyWriter:
    """Buffers events per request and writes them in batches."""

    def __init__(self, queue: WorkerQueue, worker_id: str, window_s: float) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.window_s = window_s
        self._buffer: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failing_since: float | None = None
        self._discard = False
        self._last_flush = 0.0

    def put(self, request_id: str, stream: str, event: pb.ChatEvent) -> None:
        """Queue one event of ``request_id`` for the reply stream ``stream``.

        A Started event also sets the request's started marker (same write).
        """
        pending = self._buffer.setdefault(request_id, _Pending(stream))
        if not (pending.events and merge_into(pending.events[-1], event)):
            pending.events.append(event)
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
            batch, self._buffer = self._buffer, {}
            await self._send(batch)
            if not self._buffer:
                self._idle.set()

    def failing_for(self) -> float:
        """Seconds the current write has been failing (0 when writes succeed)."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    def discard(self) -> None:
        """Drop everything buffered and the write being retried (their readers are gone)."""
        self._buffer.clear()
        self._discard = True

    async def flush(self) -> None:
        """Wait until everything put so far is written."""
        await self._idle.wait()

    async def _send(self, batch: dict[str, _Pending]) -> None:
        replies = [
            (p.stream, Reply(request_id=rid, events=p.events, worker_id=self.worker_id))
            for rid, p in batch.items()
        ]
        started = [rid for rid, p in batch.items() if p.starts]
        self._discard = False
        while not self._discard:
            try:
                await self.queue.send(replies, started)
                self._failing_since = None
                return
            except QueueUnavailable as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.warning("cannot write replies, retrying: %s", exc)
                await asyncio.sleep(RETRY_DELAY_S)
        logger.warning("discarded %d undeliverable replies", len(replies))
        self._failing_since = None
