"""The router's side of the queue: submit jobs, read replies, abort, fence attempts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from qwen_serve.queue.base import LEASE_TTL_S, WORKER_STREAM_TTL_S, QueueBase, replies_or_none
from qwen_serve.queue.codec import Job, Lease, Reply, decode_lease, encode, job_priority
from qwen_serve.queue.connection import now_ms, redis_errors_as_unavailable
from qwen_serve.queue.keys import WORKER_GROUP, Keys

ABORT_MARKER_TTL_S = 600
REPLY_STREAM_TTL_S = 3600
FENCED = Lease(fenced=True).SerializeToString()


def stream_position(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a comparable pair."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms or 0), int(seq or 0)


class RouterQueue(QueueBase):
    """The router's side: submit jobs, read replies, announce aborts, fence attempts."""

    def __init__(self, client: aioredis.Redis, keys: Keys, router_id: str, ttl_s: float) -> None:
        super().__init__(client, keys, ttl_s)
        self.router_id = router_id
        self.reply_stream = keys.replies(router_id)
        self.mark = 0
        """The newest write mark (see ``submit``)."""

    def _next_mark(self) -> int:
        self.mark = max(self.mark + 1, now_ms())
        return self.mark

    async def submit(
        self,
        jobs: Sequence[Job],
        fence: Sequence[tuple[str, int]] = (),
        placed: Sequence[str] = (),
    ) -> list[bytes]:
        """Append jobs to their job streams in one pipelined round trip; their entry refs
        (``Keys.entry_ref``).

        ``placed`` (one per job, or empty) names the worker whose own stream a job goes
        to; "" (or no ``placed``) means its priority's shared stream.

        ``fence`` (request id, attempt) pairs are fenced first, in the same round
        trip: a continuation fences the attempt it replaces. After the jobs, the
        router's heartbeat score is set to a new write mark (``self.mark``): Redis
        applies and replicates writes in order, so a mark that survives an outage
        proves that every job written with it or before survived too.
        """
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                self._fence(pipe, fence)
                streams = self._streams_of(jobs, placed)
                for stream, job in zip(streams, jobs, strict=True):
                    pipe.xadd(stream, encode(job))  # type: ignore[arg-type]
                pipe.zadd(self.keys.routers, {self.router_id: self._next_mark()})
                for stream in {s for s in streams if s not in self.keys.job_streams}:
                    pipe.expire(stream, WORKER_STREAM_TTL_S, nx=True)  # a gone worker's
                results = await pipe.execute()
        ids = results[len(fence) : len(fence) + len(jobs)]
        return [self.keys.entry_ref(s, bytes(i)) for s, i in zip(streams, ids, strict=True)]

    def _streams_of(self, jobs: Sequence[Job], placed: Sequence[str]) -> list[str]:
        workers = placed or [""] * len(jobs)
        return [
            self.keys.worker_jobs(worker) if worker else self.keys.job_stream(job_priority(job))
            for job, worker in zip(jobs, workers, strict=True)
        ]

    async def drop(self, ref: bytes) -> None:
        """Delete a job entry no worker claimed (it was written again elsewhere)."""
        stream, entry_id = self.keys.entry_stream(ref)
        with redis_errors_as_unavailable():
            await self.redis.xdel(stream, entry_id)

    async def surviving_mark(self) -> int:
        """The newest write mark Redis still has (0 if it lost them all)."""
        with redis_errors_as_unavailable():
            score: Any = await self.redis.zscore(self.keys.routers, self.router_id)
        return int(score or 0)

    async def undelivered(self, refs: Sequence[bytes]) -> list[bool]:
        """For each job entry ref: whether it is beyond what its stream delivered to the
        worker group (still queued, if it exists)."""
        located = [self.keys.entry_stream(ref) for ref in refs]
        delivered = {s: await self._last_delivered_id(s) for s in {s for s, _ in located}}
        return [
            stream_position(entry_id) > stream_position(delivered[stream])
            for stream, entry_id in located
        ]

    async def _last_delivered_id(self, stream: str) -> bytes:
        """The newest entry of ``stream`` delivered to any worker ("0-0" if none)."""
        with redis_errors_as_unavailable():
            group = await self._worker_group(stream)
        return bytes(group["last-delivered-id"]) if group else b"0-0"

    async def _worker_group(self, stream: str) -> dict[str, Any] | None:
        """``XINFO GROUPS`` of the worker group on ``stream``; None if it has none (or no
        stream)."""
        try:
            groups: Any = await self.redis.xinfo_groups(stream)
        except redis_errors.ResponseError:  # no such stream
            return None
        for group in groups:
            if group["name"] in (WORKER_GROUP, WORKER_GROUP.encode()):
                return dict(group)
        return None

    async def fence(self, attempts: Sequence[tuple[str, int]]) -> None:
        """Mark these (request id, attempt) pairs as replaced: their workers stop."""
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                self._fence(pipe, attempts)
                await pipe.execute()

    def _fence(self, pipe: Any, attempts: Sequence[tuple[str, int]]) -> None:
        for request_id, attempt in attempts:
            pipe.set(self.keys.lease(request_id, attempt), FENCED, ex=LEASE_TTL_S)

    async def attempt_states(
        self, attempts: Sequence[tuple[str, int, bytes]]
    ) -> list[tuple[Lease | None, bool]]:
        """For (request id, attempt, job entry id): the attempt's lease and whether the
        entry is pending in the worker group (claimed and not acknowledged)."""
        if not attempts:
            return []
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, attempt, ref in attempts:
                    stream, entry_id = self.keys.entry_stream(ref)
                    pipe.get(self.keys.lease(request_id, attempt))
                    pipe.xpending_range(stream, WORKER_GROUP, entry_id, entry_id, 1)
                results = await pipe.execute(raise_on_error=False)
        out: list[tuple[Lease | None, bool]] = []
        for raw, pending in zip(results[::2], results[1::2], strict=True):
            lease = decode_lease(raw) if isinstance(raw, bytes) else None
            out.append((lease, isinstance(pending, list) and bool(pending)))
        return out

    async def read_replies(
        self, last_id: bytes, block_ms: int, count: int = 512
    ) -> list[tuple[bytes, Reply | None]]:
        """Replies after ``last_id``; None for an entry that does not decode."""
        with redis_errors_as_unavailable():
            found: Any = await self.redis.xread(
                {self.reply_stream: last_id}, count=count, block=block_ms
            )
        out: list[tuple[bytes, Reply | None]] = []
        for _stream, entries in found or []:
            for entry_id, fields in entries:
                out += [(entry_id, reply) for reply in replies_or_none(fields)]
        return out

    async def last_reply_id(self) -> bytes | None:
        """The newest id this router's reply stream ever held; None if it does not exist."""
        with redis_errors_as_unavailable():
            try:
                info: Any = await self.redis.xinfo_stream(self.reply_stream)
            except redis_errors.ResponseError:
                return None
        return bytes(info["last-generated-id"])

    async def trim_replies(self, upto_id: bytes) -> None:
        """Drop reply entries already read."""
        with redis_errors_as_unavailable():
            await self.redis.xtrim(self.reply_stream, minid=upto_id, approximate=True)

    async def announce_aborts(self, aborts: Sequence[tuple[str, str]]) -> None:
        """Tell every worker to abort these (request id, tenant) pairs, also if claimed later.

        A worker honours the marker only for the request's own tenant.
        """
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, tenant in aborts:
                    marker = self.keys.abort_marker(request_id, tenant)
                    pipe.set(marker, b"1", ex=ABORT_MARKER_TTL_S)
                    pipe.publish(self.keys.aborts, request_id)
                await pipe.execute()

    async def queue_depth(self, workers: Sequence[str] = ()) -> int:
        """Jobs not yet claimed by any worker, over the shared job streams and the own
        streams of ``workers``."""
        streams = [*self.keys.job_streams, *(self.keys.worker_jobs(w) for w in workers)]
        with redis_errors_as_unavailable():
            return sum([await self._depth(stream) for stream in streams])

    async def _depth(self, stream: str) -> int:
        group = await self._worker_group(stream)
        if group is not None:
            return int(group.get("lag") or 0)
        try:
            return int(await self.redis.xlen(stream))
        except redis_errors.ResponseError:
            return 0

    async def heartbeat(self) -> None:
        """Record that this router is alive and keep its reply stream from expiring."""
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.routers, {self.router_id: self._next_mark()})
                pipe.expire(self.reply_stream, REPLY_STREAM_TTL_S)
                await pipe.execute()

    async def leave(self) -> None:
        """Remove this router's heartbeat and reply stream on a clean stop."""
        with redis_errors_as_unavailable():
            await self.redis.zrem(self.keys.routers, self.router_id)
            await self.redis.delete(self.reply_stream)
