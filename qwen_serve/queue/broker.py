"""Redis Streams operations of routers and workers: the only code that imports Redis.

Jobs go on one stream read by a consumer group of workers; each router has
its own reply stream; aborts are a pub/sub broadcast plus a short-lived
marker key; heartbeats are sorted-set scores plus a status value.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from qwen_serve.queue.codec import (
    CodecError,
    Job,
    M,
    Reply,
    WorkerStatus,
    decode,
    decode_replies,
    encode,
    encode_replies,
)
from qwen_serve.queue.keys import WORKER_GROUP, Keys
from qwen_serve.settings import QueueSettings

logger = logging.getLogger(__name__)

ABORT_MARKER_TTL_S = 600
STARTED_MARKER_TTL_S = 3600
MAX_CONNECTIONS = 32  # per process: bursts queue for a connection instead of opening more
POOL_WAIT_S = 5.0
REPLY_STREAM_MAXLEN = 100_000
REPLY_STREAM_TTL_S = 3600


class QueueUnavailable(ConnectionError):
    """Redis cannot be reached; retrying later may succeed."""


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Turn Redis connection failures into :class:`QueueUnavailable`."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise QueueUnavailable(f"redis unavailable: {exc}") from exc


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (comparable across hosts)."""
    return int(time.time() * 1000)


def connect(settings: QueueSettings, block_ms: int = 0) -> aioredis.Redis:
    """A Redis client whose calls fail fast when the server is gone.

    ACL user and password ride in the URL (``rediss://user:password@host``);
    the ``redis_tls_*`` files need a ``rediss://`` URL (certificate and host
    name are always verified).
    """
    tls = {
        name: value
        for name, value in (
            ("ssl_ca_certs", settings.redis_tls_ca_file),
            ("ssl_certfile", settings.redis_tls_cert_file),
            ("ssl_keyfile", settings.redis_tls_key_file),
        )
        if value
    }
    if tls and not settings.redis_url.startswith("rediss://"):
        raise ValueError("QS_REDIS_TLS_* files are set but the Redis URL is not rediss://")
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=2.0,
        socket_timeout=2.0 + block_ms / 1000,
        health_check_interval=10,
        **tls,
    )
    # One quick retry, no backoff: callers answer UNAVAILABLE fast instead of hanging.
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))


class _Base:
    """What routers and workers share: the client, key names and liveness reads."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    async def ping(self) -> None:
        """Raise :class:`QueueUnavailable` unless Redis answers."""
        with _redis_errors():
            await self.redis.ping()

    async def live_workers(self) -> list[WorkerStatus]:
        """Status of every worker whose heartbeat is fresh."""
        with _redis_errors():
            ids: list[Any] = await self.redis.zrangebyscore(
                self.keys.workers, now_ms() - self.ttl_ms, "+inf"
            )
            if not ids:
                return []
            values: list[Any] = await self.redis.mget(
                [self.keys.worker_status(i.decode()) for i in ids]
            )
        return [decode(WorkerStatus, v) for v in values if v is not None]

    async def reset(self) -> None:
        """Drop every pooled connection (after a failure: they may be stale)."""
        await self.redis.connection_pool.disconnect()

    async def close(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()


class RouterQueue(_Base):
    """The router's side: submit jobs, read replies, announce aborts."""

    def __init__(self, client: aioredis.Redis, keys: Keys, router_id: str, ttl_s: float) -> None:
        super().__init__(client, keys, ttl_s)
        self.router_id = router_id
        self.reply_stream = keys.replies(router_id)

    async def submit(self, jobs: Sequence[Job]) -> None:
        """Append jobs to the job stream in one pipelined round trip."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.xadd(self.keys.jobs, encode(job))  # type: ignore[arg-type]
                await pipe.execute()

    async def read_replies(
        self, last_id: bytes, block_ms: int, count: int = 512
    ) -> list[tuple[bytes, Reply | None]]:
        """Replies after ``last_id``; None for an entry that does not decode."""
        with _redis_errors():
            found: Any = await self.redis.xread(
                {self.reply_stream: last_id}, count=count, block=block_ms
            )
        out: list[tuple[bytes, Reply | None]] = []
        for _stream, entries in found or []:
            for entry_id, fields in entries:
                out += [(entry_id, reply) for reply in _replies_or_none(fields)]
        return out

    async def trim_replies(self, upto_id: bytes) -> None:
        """Drop reply entries already read."""
        with _redis_errors():
            await self.redis.xtrim(self.reply_stream, minid=upto_id, approximate=True)

    async def announce_aborts(self, request_ids: Sequence[str]) -> None:
        """Tell every worker to abort these requests (also if claimed later)."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id in request_ids:
                    pipe.set(self.keys.abort_marker(request_id), b"1", ex=ABORT_MARKER_TTL_S)
                    pipe.publish(self.keys.aborts, request_id)
                await pipe.execute()

    async def queue_depth(self) -> int:
        """Jobs not yet claimed by any worker."""
        with _redis_errors():
            try:
                groups = await self.redis.xinfo_groups(self.keys.jobs)
            except redis_errors.ResponseError:  # stream does not exist yet
                return 0
        for group in groups:
            if group["name"] in (WORKER_GROUP, WORKER_GROUP.encode()):
                return int(group.get("lag") or 0)
        return int(await self.redis.xlen(self.keys.jobs))

    async def heartbeat(self) -> None:
        """Record that this router is alive and keep its reply stream from expiring."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.routers, {self.router_id: now_ms()})
                pipe.expire(self.reply_stream, REPLY_STREAM_TTL_S)
                await pipe.execute()

    async def leave(self) -> None:
        """Remove this router's heartbeat and reply stream on a clean stop."""
        with _redis_errors():
            await self.redis.zrem(self.keys.routers, self.router_id)
            await self.redis.delete(self.reply_stream)


class WorkerQueue(_Base):
    """The worker's side: claim jobs, stream replies, acknowledge, heartbeat."""

    def __init__(self, client: aioredis.Redis, keys: Keys, worker_id: str, ttl_s: float) -> None:
        super().__init__(client, keys, ttl_s)
        self.worker_id = worker_id

    async def ensure_group(self) -> None:
        """Create the job stream's consumer group if it is missing."""
        with _redis_errors():
            try:
                await self.redis.xgroup_create(self.keys.jobs, WORKER_GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def claim(self, count: int, block_ms: int) -> list[tuple[bytes, Job | None]]:
        """Claim up to ``count`` new jobs; None for an entry that does not decode.

        Recreates the consumer group if Redis lost it (a restart without persistence).
        """
        with _redis_errors():
            try:
                found: Any = await self._read_group(count, block_ms)
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning("consumer group missing (Redis restarted?); recreating it")
                await self.ensure_group()
                found = await self._read_group(count, block_ms)
        return [
            (entry_id, _decode_or_none(Job, fields))
            for _stream, entries in found or []
            for entry_id, fields in entries
        ]

    async def _read_group(self, count: int, block_ms: int) -> Any:
        return await self.redis.xreadgroup(
            WORKER_GROUP, self.worker_id, {self.keys.jobs: ">"}, count=count, block=block_ms
        )

    async def orphaned(self, live: set[str], count: int) -> list[tuple[str, bytes, int]]:
        """Pending jobs of consumers that are not in ``live``: (consumer, entry id, deliveries)."""
        with _redis_errors():
            try:
                consumers: Any = await self.redis.xinfo_consumers(self.keys.jobs, WORKER_GROUP)
            except redis_errors.ResponseError:  # no stream or group yet
                return []
            out: list[tuple[str, bytes, int]] = []
            for consumer in consumers:
                name = _text(consumer["name"])
                if name in live or name == self.worker_id:
                    continue
                if not consumer["pending"]:
                    await self.redis.xgroup_delconsumer(self.keys.jobs, WORKER_GROUP, name)
                    continue
                pending: Any = await self.redis.xpending_range(
                    self.keys.jobs, WORKER_GROUP, "-", "+", count, consumername=name
                )
                out += [(name, p["message_id"], int(p["times_delivered"])) for p in pending]
                if len(out) >= count:
                    break
        return out[:count]

    async def take_over(self, entry_ids: Sequence[bytes]) -> list[tuple[bytes, Job | None]]:
        """Claim the given pending entries for this worker (counts as a delivery)."""
        if not entry_ids:
            return []
        with _redis_errors():
            found: Any = await self.redis.xclaim(
                self.keys.jobs, WORKER_GROUP, self.worker_id, 0, list(entry_ids)
            )
        return [(entry_id, _decode_or_none(Job, fields)) for entry_id, fields in found if fields]

    async def dead_letter(self, entry_id: bytes, job: Job | None, reason: str) -> None:
        """Move a job to the dead-letter stream and remove it from the job stream."""
        fields: dict[bytes, bytes] = {b"reason": reason.encode()}
        if job is not None:
            fields.update(encode(job))
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.keys.dead_letters, fields, maxlen=10_000, approximate=True)  # type: ignore[arg-type]
                pipe.xack(self.keys.jobs, WORKER_GROUP, entry_id)
                pipe.xdel(self.keys.jobs, entry_id)
                await pipe.execute()

    async def is_started(self, request_id: str) -> bool:
        """Whether some worker started streaming ``request_id``."""
        with _redis_errors():
            return bool(await self.redis.exists(self.keys.started(request_id)))

    async def live_routers(self) -> set[str]:
        """Ids of routers whose heartbeat is fresh."""
        with _redis_errors():
            ids: list[Any] = await self.redis.zrangebyscore(
                self.keys.routers, now_ms() - self.ttl_ms, "+inf"
            )
        return {_text(i) for i in ids}

    async def send(self, replies: Sequence[tuple[str, Reply]], started: Sequence[str] = ()) -> None:
        """Append replies to their routers' reply streams in one round trip.

        One entry per reply stream. The started markers of ``started`` are set
        first in the same pipeline, so a router that sees a Started event can rely
        on the marker (a continuation after this worker dies depends on it).
        """
        by_stream: dict[str, list[Reply]] = {}
        for stream, reply in replies:
            by_stream.setdefault(stream, []).append(reply)
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id in started:
                    pipe.set(
                        self.keys.started(request_id),
                        self.worker_id.encode(),
                        ex=STARTED_MARKER_TTL_S,
                    )
                for stream, batch in by_stream.items():
                    pipe.xadd(
                        stream,
                        encode_replies(batch),  # type: ignore[arg-type]
                        maxlen=REPLY_STREAM_MAXLEN,
                        approximate=True,
                    )
                await pipe.execute()

    async def finish(self, entry_id: bytes) -> None:
        """Acknowledge a job and delete it from the job stream."""
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.keys.jobs, WORKER_GROUP, entry_id)
                pipe.xdel(self.keys.jobs, entry_id)
                await pipe.execute()

    async def is_aborted(self, request_id: str) -> bool:
        """Whether a router has aborted ``request_id``."""
        with _redis_errors():
            return bool(await self.redis.exists(self.keys.abort_marker(request_id)))

    async def aborts(self) -> AsyncIterator[str]:
        """Request ids as routers abort them (runs until cancelled)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        with _redis_errors():
            await pubsub.subscribe(self.keys.aborts)
        try:
            while True:
                with _redis_errors():
                    message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    yield bytes(message["data"]).decode()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def heartbeat(self, status: WorkerStatus) -> None:
        """Publish this worker's status; it expires unless renewed."""
        status.heartbeat_unix_ms = now_ms()
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    self.keys.worker_status(self.worker_id),
                    status.SerializeToString(),
                    px=self.ttl_ms,
                )
                pipe.zadd(self.keys.workers, {self.worker_id: status.heartbeat_unix_ms})
                pipe.zremrangebyscore(self.keys.workers, "-inf", now_ms() - 10 * self.ttl_ms)
                await pipe.execute()

    async def leave(self) -> None:
        """Remove this worker's heartbeat on a clean stop."""
        with _redis_errors():
            await self.redis.zrem(self.keys.workers, self.worker_id)
            await self.redis.delete(self.keys.worker_status(self.worker_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _replies_or_none(fields: dict[bytes, bytes]) -> list[Reply | None]:
    try:
        return list(decode_replies(fields))
    except CodecError:
        logger.warning("dropping a malformed reply entry")
        return [None]


def _decode_or_none(kind: type[M], fields: dict[bytes, bytes]) -> M | None:
    try:
        return decode(kind, fields)
    except CodecError:
        logger.warning("dropping a malformed %s entry", kind.__name__)
        return None


def router_queue(settings: QueueSettings, router_id: str) -> RouterQueue:
    """A RouterQueue connected per ``settings``."""
    return RouterQueue(
        connect(settings, block_ms=1000),
        Keys(settings.key_prefix),
        router_id,
        settings.heartbeat_ttl_s,
    )


def worker_queue(settings: QueueSettings, worker_id: str, block_ms: int) -> WorkerQueue:
    """A WorkerQueue connected per ``settings``."""
    return WorkerQueue(
        connect(settings, block_ms=block_ms),
        Keys(settings.key_prefix),
        worker_id,
        settings.heartbeat_ttl_s,
    )
