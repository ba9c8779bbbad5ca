"""A worker's calls on other consumers' pending entries (worker/recovery.py uses them).

Entries pending on a consumer that stopped heartbeating, or idle for long on a
live one, are found here, taken over (``XCLAIM``, a new delivery), handed back
to the worker whose lease runs them, or moved to the dead-letter stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from qwen_serve.queue.base import QueueBase, decode_or_none, text
from qwen_serve.queue.codec import Job, encode
from qwen_serve.queue.connection import redis_errors_as_unavailable
from qwen_serve.queue.keys import WORKER_GROUP, Keys


class SweepingQueue(QueueBase):
    """The job streams' consumer group as one consumer (``worker_id``) sees the others."""

    def __init__(self, client: aioredis.Redis, keys: Keys, worker_id: str, ttl_s: float) -> None:
        super().__init__(client, keys, ttl_s)
        self.worker_id = worker_id

    async def stalled(self, idle_ms: int, count: int) -> list[tuple[str, bytes, int]]:
        """Pending entries of other consumers untouched for ``idle_ms``:
        (consumer, entry ref, deliveries)."""
        out: list[tuple[str, bytes, int]] = []
        with redis_errors_as_unavailable():
            for stream in self.keys.job_streams:
                try:
                    pending: Any = await self.redis.xpending_range(
                        stream, WORKER_GROUP, "-", "+", count, idle=idle_ms
                    )
                except redis_errors.ResponseError:
                    continue
                out += [
                    (
                        text(p["consumer"]),
                        self.keys.entry_ref(stream, p["message_id"]),
                        int(p["times_delivered"]),
                    )
                    for p in pending
                    if text(p["consumer"]) != self.worker_id
                ]
        return out[:count]

    async def orphaned(self, live: set[str], count: int) -> list[tuple[str, bytes, int]]:
        """Pending jobs of consumers that are not in ``live``: (consumer, entry ref,
        deliveries). A gone consumer with nothing pending is deleted."""
        out: list[tuple[str, bytes, int]] = []
        with redis_errors_as_unavailable():
            for stream in self.keys.job_streams:
                if len(out) < count:
                    out += await self._orphaned_in(stream, live, count - len(out))
        return out[:count]

    async def _orphaned_in(
        self, stream: str, live: set[str], count: int
    ) -> list[tuple[str, bytes, int]]:
        try:
            consumers: Any = await self.redis.xinfo_consumers(stream, WORKER_GROUP)
        except redis_errors.ResponseError:  # no stream or group yet
            return []
        out: list[tuple[str, bytes, int]] = []
        for consumer in consumers:
            name = text(consumer["name"])
            if name in live or name == self.worker_id:
                continue
            if not consumer["pending"]:
                await self.redis.xgroup_delconsumer(stream, WORKER_GROUP, name)
                continue
            pending: Any = await self.redis.xpending_range(
                stream, WORKER_GROUP, "-", "+", count, consumername=name
            )
            out += [
                (name, self.keys.entry_ref(stream, p["message_id"]), int(p["times_delivered"]))
                for p in pending
            ]
            if len(out) >= count:
                break
        return out

    async def take_over(
        self, refs: Sequence[bytes], min_idle_ms: int = 0
    ) -> list[tuple[bytes, Job | None]]:
        """Claim the given pending entries for this worker (counts as a delivery).

        Only entries still idle for ``min_idle_ms`` move (Redis checks it atomically).
        """
        out: list[tuple[bytes, Job | None]] = []
        with redis_errors_as_unavailable():
            for stream, ids in self._by_stream(refs).items():
                found: Any = await self.redis.xclaim(
                    stream, WORKER_GROUP, self.worker_id, min_idle_ms, ids
                )
                out += [
                    (self.keys.entry_ref(stream, entry_id), decode_or_none(Job, fields))
                    for entry_id, fields in found
                    if fields
                ]
        return out

    def _by_stream(self, refs: Iterable[bytes]) -> dict[str, list[Any]]:
        """Entry refs grouped by job stream, as stream entry ids."""
        out: dict[str, list[Any]] = {}
        for ref in refs:
            stream, entry_id = self.keys.entry_stream(ref)
            out.setdefault(stream, []).append(entry_id)
        return out

    async def hand_back(self, ref: bytes, worker_id: str) -> None:
        """Give a pending entry back to the worker whose lease runs it (no new delivery)."""
        stream, entry_id = self.keys.entry_stream(ref)
        with redis_errors_as_unavailable():
            await self.redis.xclaim(stream, WORKER_GROUP, worker_id, 0, [entry_id], justid=True)

    async def dead_letter(self, entry_id: bytes, job: Job | None, reason: str) -> None:
        """Move a job to the dead-letter stream and remove it from the job stream."""
        fields: dict[bytes, bytes] = {b"reason": reason.encode()}
        if job is not None:
            fields.update(encode(job))
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.keys.dead_letters, fields, maxlen=10_000, approximate=True)  # type: ignore[arg-type]
                self._remove(pipe, entry_id)
                await pipe.execute()

    def _remove(self, pipe: Any, ref: bytes) -> None:
        """Acknowledge an entry and delete it from its job stream (in ``pipe``)."""
        stream, entry_id = self.keys.entry_stream(ref)
        pipe.xack(stream, WORKER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
