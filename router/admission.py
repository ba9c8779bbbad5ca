"""Whether a new request may start on this router, and each tenant's share.

The router's own limits (streams at once, queue depth, streams per tenant)
are checked against the cluster view; the tenant limits held in Redis
(in-flight, requests and tokens per minute, router/quotas.py) are taken when
the stream starts and given back when it ends. A refusal is a RequestError:
UNAVAILABLE when the router cannot serve at all, RESOURCE_EXHAUSTED with a
retry hint when it is full.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from qwen_serve.aio import Tasks
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from qwen_serve.queue.broker import QueueUnavailable
from qwen_serve.queue.codec import Job
from qwen_serve.settings import RouterSettings
from router import observability
from router.cluster import ClusterView
from router.quotas import Quotas

logger = logging.getLogger(__name__)


class Admission:
    """This router's admission checks and its tenants' open streams and limit slots."""

    def __init__(self, settings: RouterSettings, quotas: Quotas, tasks: Tasks) -> None:
        self.settings = settings
        self.quotas = quotas
        self.tasks = tasks
        self._per_tenant: dict[str, int] = {}
        self._quota_held: dict[str, str] = {}
        """Tenant by request id, of the streams holding a tenant-limit slot in Redis."""

    def check(self, view: ClusterView, inflight: int, depth: int, tenant: str) -> None:
        """Raise a RequestError unless a new request of ``tenant`` can be taken now."""
        if view.draining:
            raise RequestError(UNAVAILABLE, "", "router is shutting down", retryable=True)
        if not (view.redis_ok or view.riding_out):
            raise RequestError(UNAVAILABLE, "", "queue (Redis) is unreachable", retryable=True)
        if not view.workers:
            raise RequestError(UNAVAILABLE, "", "no worker is available", retryable=True)
        if inflight >= self.settings.max_inflight or depth >= self.settings.max_queue_depth:
            raise self._full(f"server is at capacity ({inflight} streaming, {depth} queued)")
        if self._per_tenant.get(tenant, 0) >= self.settings.max_inflight_per_tenant:
            open_now = self._per_tenant[tenant]
            raise self._full(f"tenant {tenant or 'anonymous'!r} has {open_now} streams open")

    def _full(self, message: str) -> RequestError:
        return RequestError(
            RESOURCE_EXHAUSTED,
            "",
            message,
            retryable=True,
            retry_after_ms=self.settings.retry_after_ms,
        )

    async def enter(self, job: Job) -> None:
        """Count the job's stream against its tenant (RequestError if over a limit)."""
        await self._take_quota(job)
        self._per_tenant[job.tenant] = self._per_tenant.get(job.tenant, 0) + 1

    def leave(self, job: Job) -> None:
        """The job's stream has ended: give its tenant's slots back."""
        left = self._per_tenant.get(job.tenant, 0) - 1
        if left > 0:
            self._per_tenant[job.tenant] = left
        else:
            self._per_tenant.pop(job.tenant, None)
        tenant = self._quota_held.pop(job.request_id, None)
        if tenant is not None:
            release = self.quotas.release(tenant, job.request_id)
            self.tasks.spawn(_quietly("free a tenant slot", release))

    def charge(self, tenant: str, usage: pb.Usage) -> None:
        """Count a finished stream's tokens (metrics, and the tokens-per-minute limit)."""
        observability.tenant_tokens(tenant, usage)
        if not self.quotas.of(tenant).tpm:
            return
        tokens = usage.prompt_tokens + usage.completion_tokens
        self.tasks.spawn(_quietly("count a tenant's tokens", self.quotas.charge(tenant, tokens)))

    async def refresh(self) -> None:
        """Renew the limit slots this router holds (they expire with a gone router)."""
        await self.quotas.refresh([(t, r) for r, t in self._quota_held.items()])

    async def _take_quota(self, job: Job) -> None:
        """Take the tenant's limit slot in Redis (RequestError if over a limit).

        While Redis does not answer the limits are not enforced: the job could not be
        queued either, and the router's own per-tenant cap still holds.
        """
        try:
            held = await self.quotas.admit(job.tenant, job.request_id)
        except RequestError:
            observability.tenant_admission(job.tenant, "limited")
            raise
        except QueueUnavailable as exc:
            logger.debug("tenant limits not checked: %s", exc)
            held = False
        observability.tenant_admission(job.tenant, "admitted")
        if held:
            self._quota_held[job.request_id] = job.tenant


async def _quietly(what: str, call: Awaitable[None]) -> None:
    """Await a quota write; Redis failing only costs its accuracy (a slot expires)."""
    try:
        await call
    except QueueUnavailable as exc:
        logger.warning("could not %s: %s", what, exc)
