"""Every Redis key and stream name qwen-serve uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

WORKER_GROUP = "workers"
PRIORITY_LOW = 1  # qwen_serve.api.v1.Priority (kept here: keys import no generated code)
PRIORITY_HIGH = 3


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "qs"

    @property
    def jobs(self) -> str:
        """Stream of admitted NORMAL (and unset) priority jobs, read by the worker group."""
        return f"{self.prefix}:jobs"

    def job_stream(self, priority: int) -> str:
        """The job stream of an API priority: HIGH and LOW jobs have their own."""
        if priority == PRIORITY_HIGH:
            return f"{self.jobs}:high"
        if priority == PRIORITY_LOW:
            return f"{self.jobs}:low"
        return self.jobs

    @property
    def job_streams(self) -> tuple[str, str, str]:
        """Every job stream, in the order workers claim from them: HIGH, NORMAL, LOW."""
        return (
            self.job_stream(PRIORITY_HIGH),
            self.jobs,
            self.job_stream(PRIORITY_LOW),
        )

    def worker_jobs(self, worker_id: str) -> str:
        """Job stream of one worker: jobs the routers placed there (``router/placement.py``)."""
        return f"{self.jobs}:w:{worker_id}"

    def entry_ref(self, stream: str, entry_id: bytes) -> bytes:
        """A job entry's id made unique across the job streams.

        A NORMAL entry keeps its stream id (``1700000000000-0``, as before there were
        several streams); the others are prefixed with their stream's suffix
        (``high/1700000000000-0``, ``w:worker-1/1700000000000-0``).
        """
        if stream == self.jobs:
            return entry_id
        return stream.removeprefix(f"{self.jobs}:").encode() + b"/" + entry_id

    def entry_stream(self, ref: bytes) -> tuple[str, bytes]:
        """(job stream, stream entry id) of an :meth:`entry_ref`."""
        label, slash, entry_id = ref.rpartition(b"/")
        if not slash:
            return self.jobs, ref
        return f"{self.jobs}:{label.decode()}", entry_id

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
