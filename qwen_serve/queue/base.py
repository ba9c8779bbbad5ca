"""What the router's and the worker's queue share: the client, key names, liveness reads."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from qwen_serve.queue.codec import CodecError, M, Reply, WorkerStatus, decode, decode_replies
from qwen_serve.queue.connection import now_ms, redis_errors_as_unavailable
from qwen_serve.queue.keys import Keys

logger = logging.getLogger(__name__)

LEASE_TTL_S = 24 * 3600  # longer than any stream; a done lease is kept DONE_LEASE_TTL_S
DONE_LEASE_TTL_S = 600
WORKER_STREAM_TTL_S = 600
"""A worker's own job stream (jobs placed on it) outlives the worker's last heartbeat
and the routers' last write by this long; routers move what waits there when the
worker is gone."""


class QueueBase:
    """The client, key names and liveness reads of one process."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    async def ping(self) -> None:
        """Raise :class:`QueueUnavailable` unless Redis answers."""
        with redis_errors_as_unavailable():
            await self.redis.ping()

    async def live_workers(self, grace_ms: int = 0) -> list[WorkerStatus]:
        """Status of every worker whose heartbeat is fresh.

        ``grace_ms`` widens "fresh" (after a Redis outage nobody could heartbeat).
        """
        with redis_errors_as_unavailable():
            ids: list[Any] = await self.redis.zrangebyscore(
                self.keys.workers, now_ms() - self.ttl_ms - grace_ms, "+inf"
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
        """Close the connection pool; a socket that will not close in time is let go.

        Closing runs at shutdown and after probes: a slow or dead Redis must not turn
        it into a failure of its caller.
        """
        try:
            await self.redis.aclose()
        except (aioredis.RedisError, OSError) as exc:
            logger.debug("redis connections closed uncleanly: %s", exc)


def text(value: bytes | str) -> str:
    """A Redis reply field as text."""
    return value.decode() if isinstance(value, bytes) else value


def replies_or_none(fields: dict[bytes, bytes]) -> list[Reply | None]:
    """The replies of a reply-stream entry; [None] for an entry that does not decode."""
    try:
        return list(decode_replies(fields))
    except CodecError:
        logger.warning("dropping a malformed reply entry")
        return [None]


def decode_or_none(kind: type[M], fields: dict[bytes, bytes]) -> M | None:
    """A stream entry as ``kind``; None (logged) for one that does not decode."""
    try:
        return decode(kind, fields)
    except CodecError:
        logger.warning("dropping a malformed %s entry", kind.__name__)
        return None
