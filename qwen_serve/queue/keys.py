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

    def abort_marker(self, request_id: str, tenant: str = "") -> str:
        """Set while a request is aborted for ``tenant``, so a late claim sees it.

        Only an abort by the request's own tenant counts; without API keys every
        caller is tenant "" (the key name of releases before tenant scoping).
        """
        suffix = f":{tenant}" if tenant else ""
        return f"{self.prefix}:abort:{request_id}{suffix}"

    def lease(self, request_id: str, attempt: int) -> str:
        """Lease of one attempt of a request (a Lease message): who runs it.

        Attempt 0 keeps the name of the older "started" marker, so workers of the
        previous release see a leased first attempt as started during a rolling upgrade.
        """
        suffix = f":{attempt}" if attempt else ""
        return f"{self.prefix}:started:{request_id}{suffix}"

    def worker_status(self, worker_id: str) -> str:
        """Heartbeat value of one worker (a WorkerStatus message)."""
        return f"{self.prefix}:worker:{worker_id}"

    def tenant_inflight(self, tenant: str) -> str:
        """Sorted set of a tenant's open request ids scored by slot expiry (epoch ms)."""
        return f"{self.prefix}:tenant:{tenant}:inflight"

    def tenant_requests(self, tenant: str, minute: int) -> str:
        """Requests a tenant was admitted in one minute (epoch ms // 60000)."""
        return f"{self.prefix}:tenant:{tenant}:rpm:{minute}"

    def tenant_tokens(self, tenant: str, minute: int) -> str:
        """Tokens a tenant's finished requests used in one minute (epoch ms // 60000)."""
        return f"{self.prefix}:tenant:{tenant}:tpm:{minute}"
