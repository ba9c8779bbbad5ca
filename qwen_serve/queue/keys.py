"""Every Redis key and stream name qwen-serve uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

WORKER_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "qs"

    @property
    def jobs(self) -> str:
        """Stream of admitted jobs, read by the worker consumer group."""
        return f"{self.prefix}:jobs"

    @property
    def dead_letters(self) -> str:
        """Stream of jobs delivered too many times (kept for inspection)."""
        return f"{self.prefix}:jobs:dead"

    @property
    def aborts(self) -> str:
        """Pub/sub channel on which routers announce aborted request ids."""
        return f"{self.prefix}:aborts"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by last heartbeat (epoch ms)."""
        return f"{self.prefix}:workers"

    @property
    def routers(self) -> str:
        """Sorted set of router ids scored by last heartbeat (epoch ms)."""
        return f"{self.prefix}:routers"

    def replies(self, router_id: str) -> str:
        """Reply stream of one router."""
        return f"{self.prefix}:replies:{router_id}"

    def abort_marker(self, request_id: str) -> str:
        """Set while a request is aborted, so a late claim sees it."""
        return f"{self.prefix}:abort:{request_id}"

    def started(self, request_id: str) -> str:
        """Set once a worker has started streaming a request (value: worker id)."""
        return f"{self.prefix}:started:{request_id}"

    def worker_status(self, worker_id: str) -> str:
        """Heartbeat value of one worker (a WorkerStatus message)."""
        return f"{self.prefix}:worker:{worker_id}"
