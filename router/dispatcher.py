"""Batched submission and reply demultiplexing for one router.

A request passes admission (router/admission.py), is placed (router/placement.py)
and queued by the submit task, which writes jobs in pipelined batches
(``Dispatcher.open`` returns once its job is written: a ``JobStream``); the
reader task reads this router's reply stream and routes each reply to the
request's channel (router/channels.py fences it). The cluster monitor keeps
the router's heartbeat and its view of the workers (router/cluster.py). A
Redis outage up to ``redis_outage_s`` is ridden out: submissions and reads
retry, streams wait; a longer one ends open streams with a retryable
UNAVAILABLE. Lost attempts are continued elsewhere (router/recovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qwen_serve.aio import Tasks
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import UNAVAILABLE, RequestError
from qwen_serve.outage import Outage
from qwen_serve.queue.broker import QueueUnavailable, RouterQueue
from qwen_serve.queue.codec import Job, Reply
from qwen_serve.settings import RouterSettings
from router import observability
from router.admission import Admission
from router.channels import Channel, Verdict, is_terminal
from router.cluster import ClusterMonitor, ClusterView
from router.placement import Placer
from router.quotas import Quotas, load_limits
from router.recovery import StreamRecovery

logger = logging.getLogger(__name__)

TRIM_EVERY_S = 1.0
RETRY_S = 0.2

__all__ = ["Dispatcher", "JobStream", "is_terminal"]


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
        self.channels: dict[str, Channel] = {}
        self.outage = Outage(settings.redis_outage_s, settings.heartbeat_ttl_s)
        self.tasks = Tasks(f"router {settings.router_id}")
        self.recovery = StreamRecovery(self)
        self.cluster = ClusterMonitor(self)
        self.placer = Placer(settings)
        quotas = Quotas(
            queue.redis,
            queue.keys,
            load_limits(settings.tenant_limits_file),
            settings.retry_after_ms,
        )
        self.admission = Admission(settings, quotas, self.tasks)
        self._pending: asyncio.Queue[_Submission] = asyncio.Queue()
        self._aborts: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    @property
    def view(self) -> ClusterView:
        """What the cluster monitor last saw."""
        return self.cluster.view

    @property
    def listeners(self) -> list[Callable[[ClusterView], Awaitable[None]]]:
        """Called with the view after every look (health)."""
        return self.cluster.listeners

    async def start(self) -> None:
        """Take a first look at the cluster and start the background tasks."""
        await self.cluster.refresh()
        self.tasks.loop("submit", self._submit_loop)
        self.tasks.loop("reply reader", self._read_loop)
        self.tasks.loop("heartbeat", self.cluster.heartbeat_loop)
        self.tasks.loop("monitor", self.cluster.monitor_loop)
        self.tasks.loop("abort", self._abort_loop)

    async def stop(self) -> None:
        """Stop the background tasks and remove this router from Redis."""
        await self.tasks.cancel_all()
        with contextlib.suppress(QueueUnavailable):
            await self.queue.leave()

    async def set_draining(self) -> None:
        """Refuse new requests from now on."""
        self.view.draining = True
        await self.cluster.notify()

    @property
    def inflight(self) -> int:
        """Requests this router is streaming now."""
        return len(self.channels)

    def admit(self, tenant: str = "") -> None:
        """Raise a RequestError unless a new request of ``tenant`` can be taken now."""
        self.admission.check(self.view, self.inflight, self.cluster.queue_depth, tenant)

    async def open(self, job: Job) -> JobStream:
        """Take ``job``'s tenant slots, place it and queue it; its events from now on.

        The job is written to Redis when this returns. RequestError if a tenant limit
        refuses it, or if Redis stays unreachable beyond the outage bound; a failure or
        a cancellation here gives back what was taken. The caller closes the stream.
        """
        await self.admission.enter(job)
        channel = Channel(job)
        self.channels[job.request_id] = channel
        try:
            placed = self.placer.place(channel, self.view.workers)
            channel.entry_id, channel.mark = await self.submit(job, placed=placed)
        except BaseException:
            self.release(job, channel, None)
            raise
        return JobStream(self, job, channel)

    def release(self, job: Job, channel: Channel, usage: pb.Usage | None) -> None:
        """``job``'s stream has ended: with its Usage (finished) or without (abort it).

        The tokens are charged to the tenant, and the channel, the placement and the
        admission slots are given back.
        """
        if usage is not None:
            self.admission.charge(job.tenant, usage)
        self.channels.pop(job.request_id, None)
        self.placer.ended(channel)
        self.admission.leave(job)
        if usage is None:
            self._aborts.put_nowait((job.request_id, job.tenant))

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
        headers = observability.produced(job, done)
        if headers is not None:  # the worker's spans join the producer span's trace
            job.trace_context.clear()
            job.trace_context.update(headers)
        self._pending.put_nowait(_Submission(job, done, fence, placed))
        self.cluster.submitted_since_refresh += 1
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
            self.redis_answered()
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
            self.redis_answered()
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

    def redis_answered(self, took: float = 0.0) -> None:
        """A Redis call succeeded (in ``took`` s): log the end of an outage."""
        if self.outage.succeeded(took):
            logger.info("Redis answers again")

    def _fail_all(self, message: str) -> None:
        for channel in self.channels.values():
            channel.put(_error_event(UNAVAILABLE, message, True))

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


class JobStream:
    """The events of one queued job, up to its terminal one (:meth:`Dispatcher.open`).

    Whoever opened it closes it (``aclose``, or ``contextlib.aclosing``): closing it
    before the terminal event (a client that went away, a deadline, an error) aborts
    the request. Either way the dispatcher releases the job once.
    """

    def __init__(self, dispatcher: Dispatcher, job: Job, channel: Channel) -> None:
        self._dispatcher = dispatcher
        self._job = job
        self._channel = channel
        self._ended = False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> pb.ChatEvent:
        """The next event; the terminal one (Usage or Error) ends the stream."""
        if self._ended:
            raise StopAsyncIteration
        event = await self._channel.events.get()
        if is_terminal(event):
            self._end(event.usage if event.HasField("usage") else None)
        return event

    async def aclose(self) -> None:
        """Leave the stream; the request is aborted unless it has ended."""
        if not self._ended:
            self._end(None)

    def _end(self, usage: pb.Usage | None) -> None:
        self._ended = True
        self._dispatcher.release(self._job, self._channel, usage)


def _error_event(code: int, message: str, retryable: bool) -> pb.ChatEvent:
    return pb.ChatEvent(error=pb.Error(code=code, message=message, retryable=retryable))
