"""Admission, batched submission and reply demultiplexing for one router.

One submit task writes queued jobs in pipelined batches; one reader task
reads this router's reply stream and routes each reply to the request's
channel (router/channels.py fences it); one task keeps the router's
heartbeat, and one monitor task a view of Redis, the workers and the queue
depth (used by admission and health). A Redis outage up to ``redis_outage_s`` is ridden
out: submissions and reads retry, streams wait; a longer one ends open
streams with a retryable UNAVAILABLE. Lost attempts are continued elsewhere
(router/recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from qwen_serve.aio import Tasks
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from qwen_serve.outage import Outage, every
from qwen_serve.queue.broker import QueueUnavailable, RouterQueue
from qwen_serve.queue.codec import Job, Reply, WorkerStatus
from qwen_serve.settings import RouterSettings
from router import observability
from router.channels import Channel, Verdict, is_terminal
from router.placement import Placer
from router.quotas import Quotas, load_limits
from router.recovery import StreamRecovery

logger = logging.getLogger(__name__)

TRIM_EVERY_S = 1.0
RETRY_S = 0.2

__all__ = ["ClusterView", "Dispatcher", "is_terminal"]


@dataclass
class ClusterView:
    """What the monitor last saw of Redis, the workers and the queue."""

    redis_ok: bool = False
    riding_out: bool = False
    """Redis is unreachable, for less than the outage bound: requests wait for it."""
    workers: list[WorkerStatus] = field(default_factory=list)
    queue_depth: int = 0
    draining: bool = False

    @property
    def ready(self) -> bool:
        """Whether this router can take new requests."""
        return (self.redis_ok or self.riding_out) and bool(self.workers) and not self.draining

    def model(self) -> pb.ModelInfo | None:
        """The served model, as the freshest worker that reports one has it.

        A status without a model (no context length: a worker of another release, or
        a consumer that only claims) must not define the limits every request is
        checked against: it would refuse them all.
        """
        reporting = [w for w in self.workers if w.model.max_context_tokens]
        if not reporting:
            return None
        info = pb.ModelInfo()
        info.CopyFrom(max(reporting, key=lambda w: w.heartbeat_unix_ms).model)
        info.live_workers = len(self.workers)
        return info


Written = tuple[bytes, int]
"""A job's entry id and the write mark that covers it."""


@dataclass
class _Submission:
    job: Job
    done: asyncio.Future[Written]
    fence: tuple[str, int] | None = None
    placed: str = ""
    """The worker whose own stream the job goes to ("" for the shared stream)."""


class Dispatcher:
    """Moves jobs from servicer to queue and replies from queue to servicer."""

    def __init__(self, queue: RouterQueue, settings: RouterSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.view = ClusterView()
        self.listeners: list[Callable[[ClusterView], Awaitable[None]]] = []
        self.channels: dict[str, Channel] = {}
        self.outage = Outage(settings.redis_outage_s, settings.heartbeat_ttl_s)
        self.recovery = StreamRecovery(self)
        self.quotas = Quotas(
            queue.redis,
            queue.keys,
            load_limits(settings.tenant_limits_file),
            settings.retry_after_ms,
        )
        self._quota_held: dict[str, str] = {}
        """Tenant by request id, of the streams holding a tenant-limit slot in Redis."""
        self.tasks = Tasks(f"router {settings.router_id}")
        self._per_tenant: dict[str, int] = {}
        self._pending: asyncio.Queue[_Submission] = asyncio.Queue()
        self._aborts: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._submitted_since_refresh = 0
        self.placer = Placer(settings)

    async def start(self) -> None:
        """Take a first look at the cluster and start the background tasks."""
        await self._refresh()
        self.tasks.loop("submit", self._submit_loop)
        self.tasks.loop("reply reader", self._read_loop)
        self.tasks.loop("heartbeat", self._heartbeat_loop)
        self.tasks.loop("monitor", self._monitor_loop)
        self.tasks.loop("abort", self._abort_loop)

    async def stop(self) -> None:
        """Stop the background tasks and remove this router from Redis."""
        await self.tasks.cancel_all()
        with contextlib.suppress(QueueUnavailable):
            await self.queue.leave()

    async def set_draining(self) -> None:
        """Refuse new requests from now on."""
        self.view.draining = True
        await self._notify()

    @property
    def inflight(self) -> int:
        """Requests this router is streaming now."""
        return len(self.channels)

    def admit(self, tenant: str = "") -> None:
        """Raise a RequestError unless a new request of ``tenant`` can be taken now."""
        if self.view.draining:
            raise RequestError(UNAVAILABLE, "", "router is shutting down", retryable=True)
        if not (self.view.redis_ok or self.view.riding_out):
            raise RequestError(UNAVAILABLE, "", "queue (Redis) is unreachable", retryable=True)
        if not self.view.workers:
            raise RequestError(UNAVAILABLE, "", "no worker is available", retryable=True)
        depth = self.view.queue_depth + self._submitted_since_refresh
        if self.inflight >= self.settings.max_inflight or depth >= self.settings.max_queue_depth:
            raise RequestError(
                RESOURCE_EXHAUSTED,
                "",
                f"server is at capacity ({self.inflight} streaming, {depth} queued)",
                retryable=True,
                retry_after_ms=self.settings.retry_after_ms,
            )
        if self._per_tenant.get(tenant, 0) >= self.settings.max_inflight_per_tenant:
            raise RequestError(
                RESOURCE_EXHAUSTED,
                "",
                f"tenant {tenant or 'anonymous'!r} has {self._per_tenant[tenant]} streams open",
                retryable=True,
                retry_after_ms=self.settings.retry_after_ms,
            )

    async def stream(self, job: Job) -> AsyncGenerator[pb.ChatEvent, None]:
        """Submit ``job`` and yield its events up to the terminal one.

        Leaving early (client cancel, deadline, error) aborts the request.
        """
        await self._take_quota(job)
        channel = Channel(job)
        self.channels[job.request_id] = channel
        self._per_tenant[job.tenant] = self._per_tenant.get(job.tenant, 0) + 1
        finished = False
        try:
            placed = self.placer.place(channel, self.view.workers)
            channel.entry_id, channel.mark = await self.submit(job, placed=placed)
            while True:
                event = await channel.events.get()
                yield event
                if is_terminal(event):
                    finished = event.HasField("usage")
                    if finished:
                        self._charge(job.tenant, event.usage)
                    return
        finally:
            self.channels.pop(job.request_id, None)
            self.placer.ended(channel)
            self._release_tenant(job.tenant)
            self._release_quota(job.request_id)
            if not finished:
                self._aborts.put_nowait((job.request_id, job.tenant))

    def _release_tenant(self, tenant: str) -> None:
        left = self._per_tenant.get(tenant, 0) - 1
        if left > 0:
            self._per_tenant[tenant] = left
        else:
            self._per_tenant.pop(tenant, None)

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

    def _release_quota(self, request_id: str) -> None:
        tenant = self._quota_held.pop(request_id, None)
        if tenant is not None:
            self.tasks.spawn(
                self._quietly("free a tenant slot", self.quotas.release(tenant, request_id))
            )

    def _charge(self, tenant: str, usage: pb.Usage) -> None:
        observability.tenant_tokens(tenant, usage)
        if not self.quotas.of(tenant).tpm:
            return
        tokens = usage.prompt_tokens + usage.completion_tokens
        self.tasks.spawn(
            self._quietly("count a tenant's tokens", self.quotas.charge(tenant, tokens))
        )

    @staticmethod
    async def _quietly(what: str, call: Awaitable[None]) -> None:
        """Await a quota write; Redis failing only costs its accuracy (a slot expires)."""
        try:
            await call
        except QueueUnavailable as exc:
            logger.warning("could not %s: %s", what, exc)

    async def abort(self, request_id: str, tenant: str = "") -> bool:
        """Abort a request of ``tenant`` wherever it runs; True if this router streams it.

        Another tenant's request is left alone (workers honour an abort marker of
        the request's own tenant only). This router's own stream ends at once if
        no worker streams it now (a failover), else when the worker's Finished
        (abort) arrives, within ``abort_grace_s``.
        """
        channel = self.channels.get(request_id)
        if channel is None or channel.job.tenant != tenant:
            await self.queue.announce_aborts([(request_id, tenant)])
            return False
        self._aborts.put_nowait((request_id, tenant))
        live = {w.worker_id for w in self.view.workers}
        if channel.worker_id in live and not self.outage.ongoing:
            self.tasks.spawn(self._end_aborted_later(channel))
        else:
            channel.end_aborted()
        return True

    async def _end_aborted_later(self, channel: Channel) -> None:
        await asyncio.sleep(self.settings.abort_grace_s)
        channel.end_aborted()

    async def submit(
        self, job: Job, fence: tuple[str, int] | None = None, placed: str = ""
    ) -> Written:
        """Queue ``job`` for the submit task; its entry id and write mark once written.

        ``placed``: the worker whose own stream it goes to ("": the shared stream).
        RequestError (UNAVAILABLE) if Redis stays unreachable beyond the outage bound.
        """
        done: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        observability.produced(job, done)
        self._pending.put_nowait(_Submission(job, done, fence, placed))
        self._submitted_since_refresh += 1
        try:
            return await done
        except QueueUnavailable as exc:
            raise RequestError(UNAVAILABLE, "", str(exc), retryable=True) from exc

    async def _submit_loop(self) -> None:
        batch: list[_Submission] = []
        while True:
            if not batch:
                batch.append(await self._pending.get())
            while len(batch) < self.settings.submit_batch_max and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            batch = [s for s in batch if not s.done.done()]  # a caller that left
            if not batch:
                continue
            try:
                fences = [s.fence for s in batch if s.fence is not None]
                placed = [s.placed for s in batch]
                ids = await self.queue.submit([s.job for s in batch], fences, placed)
            except QueueUnavailable as exc:
                batch = await self._submit_failed(batch, exc)
                continue
            self._redis_answered()
            for submission, entry_id in zip(batch, ids, strict=True):
                if not submission.done.done():
                    submission.done.set_result((entry_id, self.queue.mark))
            batch = []

    async def _submit_failed(
        self, batch: list[_Submission], exc: QueueUnavailable
    ) -> list[_Submission]:
        """Keep the batch to retry within the outage bound; fail it beyond."""
        self.outage.failed()
        if not self.outage.beyond_bound():
            await asyncio.sleep(RETRY_S)
            return batch
        for submission in batch:
            if not submission.done.done():
                submission.done.set_exception(exc)
        return []

    async def _read_loop(self) -> None:
        last_id, last_trim = b"0-0", time.monotonic()
        while True:
            try:
                if self.recovery.reconcile_needed:
                    last_id = await self.recovery.reconcile(last_id, self._read_once)
                entries = await self.queue.read_replies(last_id, block_ms=1000)
            except QueueUnavailable as exc:
                self._read_failed(exc)
                await asyncio.sleep(RETRY_S)
                continue
            self._redis_answered()
            last_id = self._route_all(entries, last_id)
            if entries and time.monotonic() - last_trim > TRIM_EVERY_S:
                last_trim = time.monotonic()
                self.tasks.spawn(self._trim_quietly(last_id))

    async def _read_once(self, last_id: bytes) -> bytes:
        """Read and route what is in the reply stream now (no waiting)."""
        return self._route_all(await self.queue.read_replies(last_id, block_ms=0), last_id)

    def _route_all(self, entries: list[tuple[bytes, Reply | None]], last_id: bytes) -> bytes:
        for entry_id, reply in entries:
            last_id = entry_id
            channel = self.channels.get(reply.request_id) if reply else None
            if reply is None or channel is None:
                continue
            verdict = channel.accept(reply)
            if verdict is Verdict.LOST:
                self.recovery.continue_elsewhere(channel, f"attempt lost ({reply.worker_id})")
            elif verdict is Verdict.STALE:
                self.recovery.refence(channel, reply)
        return last_id

    def _read_failed(self, exc: QueueUnavailable) -> None:
        if not self.outage.ongoing:
            logger.warning("reply stream unreadable: %s", exc)
        self.outage.failed()
        self.recovery.reconcile_needed = True
        if self.outage.beyond_bound() and self.channels:
            bound = self.settings.redis_outage_s
            self._fail_all(f"lost the connection to the queue for more than {bound:g} s")

    def _redis_answered(self, took: float = 0.0) -> None:
        if self.outage.succeeded(took):
            logger.info("Redis answers again")

    async def _heartbeat_loop(self) -> None:
        """This router's heartbeat, apart from the monitor's slower round trips: workers
        abort the jobs of a router whose heartbeat is older than the TTL."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            with contextlib.suppress(QueueUnavailable):  # the monitor's probe tracks outages
                await self.queue.heartbeat()

    async def _monitor_loop(self) -> None:
        await every(self.settings.heartbeat_interval_s, self.outage, self._refresh)

    async def _refresh(self) -> None:
        began = time.monotonic()
        try:
            await self.queue.heartbeat()  # also the probe: a slow answer widens liveness
            self._redis_answered(took=time.monotonic() - began)
            workers = await self.queue.live_workers(self.outage.grace_ms())
            depth = await self.queue.queue_depth([w.worker_id for w in workers])
            await self.quotas.refresh([(t, r) for r, t in self._quota_held.items()])
        except QueueUnavailable as exc:
            if self.view.redis_ok:
                logger.warning("queue unreachable: %s", exc)
            self.outage.failed()
            self.view.redis_ok = False
            self.view.riding_out = self.outage.reached and not self.outage.beyond_bound()
        else:
            self.view.redis_ok, self.view.riding_out = True, False
            self.view.workers, self.view.queue_depth = workers, depth
            self._submitted_since_refresh = 0
            self.placer.refreshed(workers)
            live = {w.worker_id for w in workers}
            self.recovery.recover_orphans(live)
            self.tasks.spawn(self._move_overdue(live))
        await self._notify()

    async def _move_overdue(self, live: set[str]) -> None:
        """Move placed jobs that wait on a busy, stalled or gone worker to the shared stream."""
        waiting = self.placer.overdue(self.channels.values(), live)
        if not waiting:
            return
        try:
            queued = await self.queue.undelivered([c.entry_id for c, _ in waiting])
        except QueueUnavailable:
            return  # the next refresh looks again
        for (channel, gone), unclaimed in zip(waiting, queued, strict=True):
            if not channel.placed_on or channel.worker_id:
                continue  # moved by an earlier round, or its worker answered meanwhile
            if gone or unclaimed or self.placer.stalled(channel):
                why = (
                    "is gone"
                    if gone
                    else "has not claimed it"
                    if unclaimed
                    else "has not started it"
                )
                logger.info(
                    "job %s: worker %s %s; moving it to the shared stream",
                    channel.job.request_id,
                    channel.placed_on,
                    why,
                )
                self.placer.moved(channel)
                self.tasks.spawn(self._move_to_shared(channel))

    async def _move_to_shared(self, channel: Channel) -> None:
        """Queue a placed job on the shared stream and delete the placed entry. Should its
        worker claim the entry meanwhile, the attempt's lease lets only one of the two run."""
        placed = channel.entry_id
        try:
            channel.entry_id, channel.mark = await self.submit(channel.job)
            await self.queue.drop(placed)
        except (RequestError, QueueUnavailable) as exc:
            logger.warning(
                "could not move job %s to the shared stream: %s", channel.job.request_id, exc
            )
            return
        observability.placement("moved")

    def _fail_all(self, message: str) -> None:
        for channel in self.channels.values():
            channel.put(_error_event(UNAVAILABLE, message, True))

    async def _notify(self) -> None:
        for listener in self.listeners:
            await listener(self.view)

    async def _abort_loop(self) -> None:
        """Announce the aborts of abandoned streams, many per round trip, until written."""
        while True:
            batch = [await self._aborts.get()]
            while len(batch) < self.settings.submit_batch_max and not self._aborts.empty():
                batch.append(self._aborts.get_nowait())
            while True:
                try:
                    await self.queue.announce_aborts(batch)
                    break
                except QueueUnavailable as exc:
                    self.outage.failed()
                    logger.warning("could not announce %d aborts yet: %s", len(batch), exc)
                    await asyncio.sleep(RETRY_S * 5)

    async def _trim_quietly(self, upto: bytes) -> None:
        with contextlib.suppress(QueueUnavailable):
            await self.queue.trim_replies(upto)


def _error_event(code: int, message: str, retryable: bool) -> pb.ChatEvent:
    return pb.ChatEvent(error=pb.Error(code=code, message=message, retryable=retryable))
