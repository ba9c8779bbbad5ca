"""The worker's side of the queue: claims, leases, replies, aborts, heartbeats.

A worker claims jobs with ``XREADGROUP``. Before its engine generates, it
takes the attempt's lease (``SET NX``, with the abort check in the same
round trip), so at most one worker streams an attempt; once a heartbeat it
re-reads the leases and abort markers of what it runs (the audit) and
renews the idle time of their entries, so an entry idle for long is one
nobody runs. What a worker does with other workers' pending entries (take
over, hand back, dead-letter) is in ``qwen_serve/queue/sweeps.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from qwen_serve.queue.base import (
    DONE_LEASE_TTL_S,
    LEASE_TTL_S,
    WORKER_STREAM_TTL_S,
    decode_or_none,
    text,
)
from qwen_serve.queue.codec import Job, Lease, Reply, WorkerStatus, decode_lease
from qwen_serve.queue.codec import encode_replies as encode_batch
from qwen_serve.queue.connection import QueueUnavailable, now_ms, redis_errors_as_unavailable
from qwen_serve.queue.keys import PRIORITY_HIGH, PRIORITY_LOW, WORKER_GROUP, Keys
from qwen_serve.queue.sweeps import SweepingQueue

logger = logging.getLogger(__name__)

REPLY_STREAM_MAXLEN = 100_000
LOW_SHARE = 8
"""A worker takes one LOW job first after this many claimed jobs of other priorities."""
PUBSUB_CLOSE_S = 2.0


class AttemptRef(NamedTuple):
    """One attempt a worker runs (or is about to): what its lease and abort keys need."""

    request_id: str
    attempt: int
    tenant: str
    entry_id: bytes


class LeaseCheck(NamedTuple):
    """The answer of :meth:`WorkerQueue.acquire` and :meth:`WorkerQueue.audit`."""

    aborted: bool
    holder: Lease | None
    """None: the lease is this worker's. Otherwise who else holds it (or its tombstone)."""
    again: bool = False
    """The lease was this worker's already (for ``acquire``: the attempt ran here before)."""


class WorkerQueue(SweepingQueue):
    """The worker's side: claim jobs, hold leases, stream replies, heartbeat."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        worker_id: str,
        ttl_s: float,
        outage_s: float = 0.0,
    ) -> None:
        super().__init__(client, keys, worker_id, ttl_s)
        self.status_ttl_ms = self.ttl_ms + int(outage_s * 1000)
        self.claims_since_low = 0

    # -------------------------------------------------------------- claims

    @property
    def streams(self) -> tuple[str, str, str, str]:
        """The job streams this worker claims from, in order: HIGH, its own (jobs placed
        here by the routers), NORMAL, LOW."""
        high, normal, low = self.keys.job_streams
        return high, self.keys.worker_jobs(self.worker_id), normal, low

    async def ensure_group(self) -> None:
        """Create the job streams' consumer group where it is missing."""
        with redis_errors_as_unavailable():
            for stream in self.streams:
                try:
                    await self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
                except redis_errors.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def claim(
        self, count: int, block_ms: int, others: int | None = None
    ) -> list[tuple[bytes, Job | None]]:
        """Claim up to ``count`` new jobs from :attr:`streams` (HIGH, this worker's
        placed jobs, NORMAL, LOW), of which at most ``others`` (default ``count``) not
        HIGH; None for an entry that does not decode.

        One read per stream in that order until enough are found. Every ``LOW_SHARE``
        jobs claimed, one LOW job is taken first, so LOW makes progress under a steady
        flood of higher priorities. With nothing queued, one blocking read waits on the
        streams it may claim from (at most one entry of each: a claim may exceed
        ``count`` by three when jobs arrive on several streams at once; the engine
        queues them by priority). Recreates the consumer group if Redis lost it (a
        restart without persistence).
        """
        others = count if others is None else min(others, count)
        found: list[tuple[bytes, Job | None]] = []
        high = self.keys.job_stream(PRIORITY_HIGH)
        for stream, most in self._claim_plan(count):
            room = count - len(found)
            if stream != high:
                room = min(room, others - self._others_in(found))
            if room > 0:
                found += await self._read_group({stream: ">"}, min(most, room))
        if not found and block_ms:
            streams = self.streams if others > 0 else (high,)
            found = await self._read_group({s: ">" for s in streams}, 1, block_ms)
        self._count_low(found)
        return found

    def _claim_plan(self, count: int) -> list[tuple[str, int]]:
        """(stream, most to read) in claim order."""
        plan = [(stream, count) for stream in self.streams]
        low = self.streams[-1]
        if self.claims_since_low >= LOW_SHARE:
            plan.insert(0, (low, 1))
        return plan

    def _others_in(self, found: list[tuple[bytes, Job | None]]) -> int:
        high = self.keys.job_stream(PRIORITY_HIGH)
        return sum(1 for ref, _ in found if self.keys.entry_stream(ref)[0] != high)

    def _count_low(self, found: list[tuple[bytes, Job | None]]) -> None:
        low = self.keys.job_stream(PRIORITY_LOW)
        for ref, _ in found:
            is_low = self.keys.entry_stream(ref)[0] == low
            self.claims_since_low = 0 if is_low else self.claims_since_low + 1

    async def own_pending(self, count: int) -> list[tuple[bytes, Job | None]]:
        """Entries delivered to this worker and not acknowledged (its pending list).

        A claim whose answer never arrived (a timeout, a stall) left its jobs here.
        """
        return await self._read_group({s: "0" for s in self.streams}, count)

    async def _read_group(
        self, streams: dict[str, str], count: int, block_ms: int | None = None
    ) -> list[tuple[bytes, Job | None]]:
        with redis_errors_as_unavailable():
            try:
                found: Any = await self._xreadgroup(streams, count, block_ms)
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning("consumer group missing (Redis restarted?); recreating it")
                await self.ensure_group()
                found = await self._xreadgroup(streams, count, block_ms)
        # A pending entry deleted meanwhile reads as empty: None, like a malformed one.
        return [
            (
                self.keys.entry_ref(text(stream), entry_id),
                decode_or_none(Job, fields) if fields else None,
            )
            for stream, entries in found or []
            for entry_id, fields in entries
        ]

    async def _xreadgroup(self, streams: dict[str, str], count: int, block_ms: int | None) -> Any:
        return await self.redis.xreadgroup(
            WORKER_GROUP,
            self.worker_id,
            streams,  # type: ignore[arg-type]
            count=count,
            block=block_ms,
        )

    async def pending_count(self) -> int:
        """How many entries this worker holds in the group's pending lists."""
        total = 0
        with redis_errors_as_unavailable():
            for stream in self.streams:
                try:
                    summary: Any = await self.redis.xpending(stream, WORKER_GROUP)
                except redis_errors.ResponseError:
                    continue
                for consumer in summary.get("consumers") or []:
                    if text(consumer["name"]) == self.worker_id:
                        total += int(consumer["pending"])
        return total

    # -------------------------------------------------------------- leases

    def _lease_value(self, entry_id: bytes, done: bool = False) -> bytes:
        return Lease(
            worker_id=self.worker_id, entry_id=entry_id.decode(), done=done
        ).SerializeToString()

    async def lease_of(self, request_id: str, attempt: int) -> Lease | None:
        """The lease of one attempt, if any worker (or a router's fence) set it."""
        with redis_errors_as_unavailable():
            raw: Any = await self.redis.get(self.keys.lease(request_id, attempt))
        return decode_lease(raw) if raw is not None else None

    async def acquire(self, ref: AttemptRef) -> LeaseCheck:
        """Whether ``ref`` was aborted, and take its lease unless somebody holds it."""
        (check,) = await self.audit([ref], touch=False)
        return check

    async def audit(self, refs: Sequence[AttemptRef], touch: bool = True) -> list[LeaseCheck]:
        """For each attempt: aborted?, and its lease (re-taken if Redis lost it).

        With ``touch``, the entries' idle time restarts (they are being run).
        One round trip.
        """
        if not refs:
            return []
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for ref in refs:
                    pipe.exists(self.keys.abort_marker(ref.request_id, ref.tenant))
                    pipe.set(
                        self.keys.lease(ref.request_id, ref.attempt),
                        self._lease_value(ref.entry_id),
                        nx=True,
                        get=True,
                        ex=LEASE_TTL_S,
                    )
                if touch:
                    for stream, ids in self._by_stream(r.entry_id for r in refs).items():
                        pipe.xclaim(stream, WORKER_GROUP, self.worker_id, 0, ids, justid=True)
                results = await pipe.execute()
        pairs = zip(results[0 : 2 * len(refs) : 2], results[1 : 2 * len(refs) : 2], strict=True)
        return [
            LeaseCheck(bool(aborted), self._holder(ref, raw), raw is not None)
            for ref, (aborted, raw) in zip(refs, pairs, strict=True)
        ]

    def _holder(self, ref: AttemptRef, raw: bytes | None) -> Lease | None:
        if raw is None:
            return None
        lease = decode_lease(raw)
        mine = lease.worker_id == self.worker_id and lease.entry_id == ref.entry_id.decode()
        return None if mine and not (lease.done or lease.fenced) else lease

    # -------------------------------------------------------------- replies and ends

    async def send(
        self,
        replies: Sequence[tuple[str, Reply]],
        ends: Sequence[tuple[bytes, AttemptRef | None]] = (),
    ) -> None:
        """Append replies to their routers' reply streams (one entry per stream), then
        acknowledge the jobs of ``ends`` (``finish``): one round trip, in that order."""
        by_stream: dict[str, list[Reply]] = {}
        for stream, reply in replies:
            by_stream.setdefault(stream, []).append(reply)
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, batch in by_stream.items():
                    pipe.xadd(
                        stream,
                        encode_batch(batch),  # type: ignore[arg-type]
                        maxlen=REPLY_STREAM_MAXLEN,
                        approximate=True,
                    )
                for entry_id, leased in ends:
                    self._finish(pipe, entry_id, leased)
                await pipe.execute()

    async def finish(self, entry_id: bytes, leased: AttemptRef | None = None) -> None:
        """Acknowledge a job and delete it from the job stream; mark its lease done."""
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                self._finish(pipe, entry_id, leased)
                await pipe.execute()

    def _finish(self, pipe: Any, entry_id: bytes, leased: AttemptRef | None) -> None:
        self._remove(pipe, entry_id)
        if leased is not None:
            pipe.set(
                self.keys.lease(leased.request_id, leased.attempt),
                self._lease_value(entry_id, done=True),
                ex=DONE_LEASE_TTL_S,
            )

    # -------------------------------------------------------------- aborts

    async def is_aborted(self, request_id: str, tenant: str = "") -> bool:
        """Whether ``request_id`` was aborted by its tenant."""
        with redis_errors_as_unavailable():
            return bool(await self.redis.exists(self.keys.abort_marker(request_id, tenant)))

    async def aborts(self) -> AsyncIterator[str]:
        """Request ids as routers abort them; raises QueueUnavailable when the channel breaks.

        The ids are hints: the tenant-scoped abort marker decides (``is_aborted``).
        """
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            with _pubsub_errors():
                await pubsub.subscribe(self.keys.aborts)
            while True:
                with _pubsub_errors():
                    message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    yield bytes(message["data"]).decode(errors="replace")
        finally:
            with contextlib.suppress(Exception):  # TimeoutError: a connection that hangs
                await asyncio.wait_for(pubsub.aclose(), PUBSUB_CLOSE_S)  # type: ignore[no-untyped-call]

    # -------------------------------------------------------------- liveness

    async def live_routers(self, grace_ms: int = 0) -> set[str]:
        """Ids of routers whose heartbeat is fresh (``grace_ms`` widens fresh)."""
        with redis_errors_as_unavailable():
            ids: list[Any] = await self.redis.zrangebyscore(
                self.keys.routers, now_ms() - self.ttl_ms - grace_ms, "+inf"
            )
        return {text(i) for i in ids}

    async def heartbeat(self, status: WorkerStatus) -> None:
        """Publish this worker's status; it expires unless renewed (TTL plus the outage bound)."""
        status.heartbeat_unix_ms = now_ms()
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    self.keys.worker_status(self.worker_id),
                    status.SerializeToString(),
                    px=self.status_ttl_ms,
                )
                pipe.zadd(self.keys.workers, {self.worker_id: status.heartbeat_unix_ms})
                pipe.zremrangebyscore(self.keys.workers, "-inf", now_ms() - 10 * self.ttl_ms)
                pipe.expire(self.keys.worker_jobs(self.worker_id), WORKER_STREAM_TTL_S)
                await pipe.execute()

    async def leave(self) -> None:
        """Remove this worker's heartbeat on a clean stop."""
        with redis_errors_as_unavailable():
            await self.redis.zrem(self.keys.workers, self.worker_id)
            await self.redis.delete(self.keys.worker_status(self.worker_id))


@contextlib.contextmanager
def _pubsub_errors() -> Iterator[None]:
    """Connection failures of a subscription, including redis-py's AttributeError on a
    connection torn down under it by a Redis restart, as QueueUnavailable."""
    try:
        with redis_errors_as_unavailable():
            yield
    except AttributeError as exc:
        raise QueueUnavailable(f"abort subscription broken: {exc!r}") from exc
