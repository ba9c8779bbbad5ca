"""Tracking a Redis outage: how long it has lasted, and the grace after it.

An outage starts at the last call that succeeded before a failure (a call
stuck in a paused or dead server fails only after its socket timeout), and
ends at the next success; a quick call that took over a second counts as
one that just ended. During an outage nobody can heartbeat, so right
after it every heartbeat looks stale: for one heartbeat TTL after Redis is
back, liveness checks widen their window by the outage's length instead of
declaring everyone dead. A process that was itself stalled (CPU starvation,
a long GC, a paused VM: its periodic checks wake late) widens its window the
same way, since whatever stalled it may have stalled the others' heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

SLOW_CALL_S = 1.0


class Outage:
    """Failures and successes of one process's Redis calls."""

    def __init__(self, bound_s: float, ttl_s: float) -> None:
        self.bound_s = bound_s
        self.ttl_s = ttl_s
        self._last_ok = time.monotonic()
        self.reached = False
        """Whether any call ever succeeded (a process that never reached Redis rides out
        nothing)."""
        self._since: float | None = None
        self._last_length = 0.0
        self._ended_at = float("-inf")

    def failed(self) -> None:
        """A call failed because Redis was unreachable."""
        if self._since is None:
            self._since = self._last_ok

    def succeeded(self, took: float = 0.0) -> bool:
        """A call succeeded; True if that ends an outage.

        ``took``: how long a call that should be quick took. Longer than
        SLOW_CALL_S counts as an outage that just ended (a pause makes calls slow
        before it makes them fail).
        """
        now = time.monotonic()
        self._last_ok, self.reached = now, True
        if self._since is None:
            self.stalled(took)
            return False
        self._last_length = now - self._since
        self._ended_at, self._since = now, None
        return True

    def stalled(self, seconds: float) -> None:
        """Redis or this process could not run for ``seconds``: beyond SLOW_CALL_S, count
        it as an outage that just ended (heartbeats may be that much older, through no
        fault of their writers)."""
        if seconds > SLOW_CALL_S:
            self._last_length = max(seconds, self.grace_ms() / 1000)
            self._ended_at = time.monotonic()

    @property
    def ongoing(self) -> bool:
        """Whether the last call failed."""
        return self._since is not None

    def lasted(self) -> float:
        """Seconds the current outage has lasted (0 if none)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    def beyond_bound(self) -> bool:
        """Whether the current outage is longer than the bound ridden out."""
        return self.lasted() > self.bound_s

    def grace_ms(self) -> int:
        """How much to widen heartbeat freshness now (ms): the outage's length while
        one is under way or for a TTL after it ended, else 0."""
        if self._since is not None:
            return int(self.lasted() * 1000)
        if time.monotonic() - self._ended_at < self.ttl_s:
            return int(self._last_length * 1000)
        return 0


async def every(interval_s: float, outage: Outage, tick: Callable[[], Awaitable[None]]) -> None:
    """Run ``tick`` every ``interval_s`` seconds, forever. A round that took longer than
    that by more than SLOW_CALL_S (a late wake-up, or a tick that could not run) widens
    the liveness window first (``Outage.stalled``)."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        outage.stalled(now - last - interval_s)
        last = now
        await tick()
