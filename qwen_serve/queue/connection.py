"""Connecting to Redis: a plain URL or Redis Sentinel, with ACL users and TLS.

Every Redis client of routers and workers is made here. A call that cannot
reach Redis raises :class:`QueueUnavailable`; the callers decide how long to
keep retrying (``redis_outage_s``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from qwen_serve.settings import SharedSettings

MAX_CONNECTIONS = 32  # per process: bursts queue for a connection instead of opening more
POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 2.0
SENTINEL_PORT = 26379
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class QueueUnavailable(ConnectionError):
    """Redis cannot be reached; retrying later may succeed."""


@contextlib.contextmanager
def redis_errors_as_unavailable() -> Iterator[None]:
    """Turn Redis connection failures into :class:`QueueUnavailable`.

    A READONLY reply means the server we reached is a replica (a failover is under
    way, or a stale address): that is an outage too. So is uvloop's RuntimeError on
    writing to a socket the server has just closed (redis-py's HELLO on a connection
    to a restarting Redis), where redis-py expects a connection error.
    """
    try:
        yield
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.ReadOnlyError,
        OSError,
    ) as exc:
        raise QueueUnavailable(f"redis unavailable: {exc}") from exc
    except RuntimeError as exc:
        if CLOSED_TRANSPORT not in str(exc):
            raise
        raise QueueUnavailable(f"redis unavailable: {exc}") from exc


CLOSED_TRANSPORT = "the handler is closed"
"""How uvloop ends its RuntimeError on an operation on a closed transport."""


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (comparable across hosts)."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``.

    The user and password are those of the Redis servers (not of the Sentinels).
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {parts.scheme}://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = [_host_port(item) for item in hosts.split(",") if item]
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2:
        raise ValueError("a Sentinel URL needs host:port[,host:port...]/service[/db]")
    return SentinelUrl(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        tls=parts.scheme == "rediss+sentinel",
    )


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, ""
    return host, int(port) if port else SENTINEL_PORT


def _tls_kwargs(settings: SharedSettings, tls_url: bool) -> dict[str, Any]:
    tls = {
        name: value
        for name, value in (
            ("ssl_ca_certs", settings.redis_tls_ca_file),
            ("ssl_certfile", settings.redis_tls_cert_file),
            ("ssl_keyfile", settings.redis_tls_key_file),
        )
        if value
    }
    if tls and not tls_url:
        raise ValueError("QS_REDIS_TLS_* files are set but the Redis URL is not rediss://")
    return tls


def connect(settings: SharedSettings, block_ms: int = 0) -> aioredis.Redis:
    """A Redis client whose calls fail fast when the server is gone.

    ACL user and password ride in the URL (``rediss://user:password@host``);
    the ``redis_tls_*`` files need a ``rediss://`` (or ``rediss+sentinel://``)
    URL: certificate and host name are always verified. A Sentinel URL gives a
    client of the service's current primary, which follows failovers.
    """
    options: dict[str, Any] = {
        "max_connections": MAX_CONNECTIONS,
        "timeout": POOL_WAIT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S + block_ms / 1000,
        "health_check_interval": 10,
        # One quick retry, no backoff: callers decide how long to keep trying.
        "retry": Retry(NoBackoff(), 1),
    }
    if urlsplit(settings.redis_url).scheme in SENTINEL_SCHEMES:
        return _sentinel_client(settings, options)
    tls = _tls_kwargs(settings, settings.redis_url.startswith("rediss://"))
    pool = BlockingConnectionPool.from_url(settings.redis_url, **options, **tls)
    return aioredis.Redis.from_pool(pool)


class _SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it asks the Sentinels for the primary) that queues bursts."""


def _sentinel_client(settings: SharedSettings, options: dict[str, Any]) -> aioredis.Redis:
    url = parse_sentinel_url(settings.redis_url)
    tls = _tls_kwargs(settings, url.tls)
    if url.tls:
        tls["ssl"] = True
    sentinel_options = {
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "username": settings.redis_sentinel_username,
        "password": settings.redis_sentinel_password,
        **tls,
    }
    sentinel = Sentinel(url.sentinels, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        url.service,
        connection_pool_class=_SentinelBlockingPool,
        db=url.db,
        username=url.username,
        password=url.password,
        **options,
        **tls,
    )
    return client
