"""Tenant limits held in Redis, so they are exact across every router of a deployment.

A limits file (``QS_TENANT_LIMITS_FILE``) gives each tenant up to three limits, one
line per tenant (``*`` for every tenant not named; ``#`` comments and blank lines
ignored)::

    acme     inflight=4 rpm=120 tpm=200000
    *        inflight=16

- ``inflight``: streams open at once, counted in a sorted set of request ids per
  tenant. Each router refreshes the expiry of its own members every heartbeat, so
  a router that dies frees its tenants' slots within ``QUOTA_HOLD_S``.
- ``rpm``: requests admitted per calendar minute.
- ``tpm``: tokens (prompt + output) of finished requests per calendar minute. A
  request is admitted while the minute's count is under the limit: its own tokens
  are only known once it ends, so a minute may overshoot by what was in flight.

One Lua script checks and takes all three atomically, so concurrent routers never
admit more than the limit. A refused request gets RESOURCE_EXHAUSTED with a retry
hint: the router's ``retry_after_ms`` for ``inflight``, the time to the next minute
for ``rpm`` and ``tpm``. While Redis is unreachable the limits are not enforced
(the router's own per-tenant cap still is); the job could not be queued anyway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_serve.errors import RESOURCE_EXHAUSTED, RequestError
from qwen_serve.queue.connection import now_ms, redis_errors_as_unavailable
from qwen_serve.queue.keys import Keys

logger = logging.getLogger(__name__)

QUOTA_HOLD_S = 30.0
"""How long an in-flight slot outlives its router's last refresh."""
MINUTE_MS = 60_000
ANY_TENANT = "*"
_FIELD = re.compile(r"(inflight|rpm|tpm)=(\d+)")
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}|\*")

# KEYS: in-flight set, this minute's request count, this minute's token count.
# ARGV: now ms, slot expiry ms, request id, inflight, rpm, tpm (0: no limit).
# Returns {0} when admitted, else {1|2|3 (which limit), the count that hit it}.
_ADMIT = """
local now, expiry = tonumber(ARGV[1]), tonumber(ARGV[2])
local inflight, rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = redis.call('ZCARD', KEYS[1])
if inflight > 0 and open >= inflight then return {1, open} end
local requests = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and requests >= rpm then return {2, requests} end
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
if tpm > 0 and tokens >= tpm then return {3, tokens} end
redis.call('ZADD', KEYS[1], expiry, ARGV[3])
redis.call('PEXPIREAT', KEYS[1], expiry)
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 120000)
return {0, 0}
"""


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; 0 is no limit."""

    inflight: int = 0
    rpm: int = 0
    tpm: int = 0

    @property
    def any(self) -> bool:
        """Whether any limit is set."""
        return bool(self.inflight or self.rpm or self.tpm)


def parse_limits(lines: Iterable[str], where: str) -> dict[str, TenantLimits]:
    """Limits by tenant from a limits file's lines; ValueError names the bad line."""
    limits: dict[str, TenantLimits] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tenant, *fields = line.split()
        here = f"{where}:{number}"
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"{here}: a tenant is 1-64 characters of [A-Za-z0-9._-], or *")
        if tenant in limits:
            raise ValueError(f"{here}: tenant {tenant!r} is listed twice")
        values: dict[str, int] = {}
        for item in fields:
            match = _FIELD.fullmatch(item)
            if match is None:
                raise ValueError(f"{here}: expected inflight=N, rpm=N or tpm=N, got {item!r}")
            values[match[1]] = int(match[2])
        limits[tenant] = TenantLimits(**values)
    return limits


def load_limits(path: str | None) -> dict[str, TenantLimits]:
    """The limits file at ``path`` ({} without one)."""
    if not path:
        return {}
    return parse_limits(Path(path).read_text().splitlines(), path)


class Quotas:
    """Admits, releases and charges tenants' requests against their limits in Redis."""

    def __init__(
        self, client: Any, keys: Keys, limits: dict[str, TenantLimits], retry_after_ms: int
    ) -> None:
        self.redis = client
        self.keys = keys
        self.limits = limits
        self.retry_after_ms = retry_after_ms
        self._admit = client.register_script(_ADMIT)

    def of(self, tenant: str) -> TenantLimits:
        """The limits that apply to ``tenant``."""
        return self.limits.get(tenant) or self.limits.get(ANY_TENANT) or TenantLimits()

    async def admit(self, tenant: str, request_id: str) -> bool:
        """Take a slot for ``request_id``; RequestError if a limit is reached.

        False when ``tenant`` has no limits (nothing was taken, nothing to release).
        QueueUnavailable when Redis does not answer.
        """
        limits = self.of(tenant)
        if not limits.any:
            return False
        now = now_ms()
        minute = now // MINUTE_MS
        keys = [
            self.keys.tenant_inflight(tenant),
            self.keys.tenant_requests(tenant, minute),
            self.keys.tenant_tokens(tenant, minute),
        ]
        args = [now, now + int(QUOTA_HOLD_S * 1000), request_id]
        with redis_errors_as_unavailable():
            which, count = await self._admit(keys, [*args, *_limit_args(limits)])
        if int(which):
            raise self._refusal(tenant, limits, int(which), int(count), now)
        return True

    def _refusal(
        self, tenant: str, limits: TenantLimits, which: int, count: int, now: int
    ) -> RequestError:
        name = tenant or "anonymous"
        if which == 1:
            detail = f"tenant {name!r} has {count} streams open (limit {limits.inflight})"
            retry_ms = self.retry_after_ms
        else:
            unit, limit = ("requests", limits.rpm) if which == 2 else ("tokens", limits.tpm)
            detail = f"tenant {name!r} used {count} {unit} this minute (limit {limit})"
            retry_ms = MINUTE_MS - now % MINUTE_MS
        return RequestError(RESOURCE_EXHAUSTED, "", detail, retryable=True, retry_after_ms=retry_ms)

    async def release(self, tenant: str, request_id: str) -> None:
        """Free ``request_id``'s slot."""
        with redis_errors_as_unavailable():
            await self.redis.zrem(self.keys.tenant_inflight(tenant), request_id)

    async def charge(self, tenant: str, tokens: int) -> None:
        """Count ``tokens`` against ``tenant``'s tokens of this minute."""
        if tokens <= 0:
            return
        key = self.keys.tenant_tokens(tenant, now_ms() // MINUTE_MS)
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incrby(key, tokens)
                pipe.pexpire(key, 2 * MINUTE_MS)
                await pipe.execute()

    async def refresh(self, held: Iterable[tuple[str, str]]) -> None:
        """Extend the slots this router holds, (tenant, request id) pairs."""
        by_tenant: dict[str, dict[str, int]] = {}
        expiry = now_ms() + int(QUOTA_HOLD_S * 1000)
        for tenant, request_id in held:
            by_tenant.setdefault(tenant, {})[request_id] = expiry
        if not by_tenant:
            return
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for tenant, members in by_tenant.items():
                    key = self.keys.tenant_inflight(tenant)
                    pipe.zadd(key, members, xx=True)
                    pipe.pexpireat(key, expiry)
                await pipe.execute()


def _limit_args(limits: TenantLimits) -> list[int]:
    return [limits.inflight, limits.rpm, limits.tpm]
