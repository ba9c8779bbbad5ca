"""Streams of events where consecutive deltas of one choice may be merged.

Used twice: the worker merges deltas that wait for the next write to Redis,
and the router merges deltas that wait for a slow client, so a stream that
fell behind catches up with fewer, larger messages.
"""

from __future__ import annotations

import asyncio
from collections import deque

from qwen_serve.api.v1 import serve_pb2 as pb


def merge_into(last: pb.ChatEvent, new: pb.ChatEvent) -> bool:
    """Append delta ``new`` to delta ``last`` of the same choice; False if not mergeable."""
    if not (last.HasField("delta") and new.HasField("delta")):
        return False
    a, b = last.delta, new.delta
    if a.index != b.index:
        return False
    a.reasoning += b.reasoning
    a.content += b.content
    a.tool_calls.extend(b.tool_calls)
    a.logprobs.extend(b.logprobs)
    a.token_ids.extend(b.token_ids)
    return True


class EventQueue:
    """A FIFO of one stream's events; a Delta merges into a waiting Delta of its choice."""

    def __init__(self) -> None:
        self._items: deque[pb.ChatEvent] = deque()
        self._ready = asyncio.Event()

    def put(self, event: pb.ChatEvent) -> None:
        """Queue ``event`` (merged into the last waiting one when possible)."""
        if self._items and merge_into(self._items[-1], event):
            return
        self._items.append(event)
        self._ready.set()

    async def get(self) -> pb.ChatEvent:
        """The oldest waiting event."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
