"""Admission, batched submission and reply demultiplexing for one router.

One submit task writes queued jobs in pipelined batches; one reader task
reads this router's reply stream and routes each reply to the request's
in-memory channel; one monitor task keeps the router's heartbeat and a view
of Redis, the workers and the queue depth (used by admission and health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import EventQueue
from qwen_serve.errors import RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from qwen_serve.queue.broker import QueueUnavailable, RouterQueue
from qwen_serve.queue.codec import Job, Reply, WorkerStatus
from qwen_serve.settings import RouterSettings
from router import jobs, observability

logger = logging.getLogger(__name__)

TRIM_EVERY_S = 1.0


@dataclass
class ClusterView:
    """What the monitor last saw of Redis, the workers and the queue."""

    redis_ok: bool = False
    workers: list[WorkerStatus] = field(default_factory=list)
    queue_depth: int = 0
    draining: bool = False

    @property
    def ready(self) -> bool:
        """Whether this router can take new requests."""
        return self.redis_ok and bool(self.workers) and not self.draining

    def model(self) -> pb.ModelInfo | None:
        """The served model, as the freshest worker reports it."""
        if not self.workers:
            return None
        info = pb.ModelInfo()
        info.CopyFrom(max(self.workers, key=lambda w: w.heartbeat_unix_ms).model)
        info.live_workers = len(self.workers)
        return info


@dataclass
class _Channel:
    """Events of one request on their way from the reader to the servicer.

    It remembers what a continuation needs if the worker dies mid-stream: the
    job, the tokens of choice 0 delivered so far and the workers lost.
    """

    job: Job
    events: EventQueue = field(default_factory=EventQueue)
    worker_id: str = ""
    started: bool = False
    token_ids: list[int] = field(default_factory=list)
    lost_workers: set[str] = field(default_factory=set)

    def deliver(self, reply: Reply) -> None:
        """Queue a reply's events, dropping a repeated Started."""
        self.worker_id = reply.worker_id
        for event in reply.events:
            kind = event.WhichOneof("event")
            if kind == "started":
                if self.started:
                    continue
                self.started = True
            elif kind == "delta" and event.delta.index == 0:
                self.token_ids.extend(event.delta.token_ids)
            self.events.put(event)


def _error_event(code: int, message: str, retryable: bool) -> pb.ChatEvent:
    return pb.ChatEvent(error=pb.Error(code=code, message=message, retryable=retryable))


def is_terminal(event: pb.ChatEvent) -> bool:
    """Usage and Error are the last event of a stream."""
    return event.WhichOneof("event") in ("usage", "error")


class Dispatcher:
    """Moves jobs from servicer to queue and replies from queue to servicer."""

    def __init__(self, queue: RouterQueue, settings: RouterSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.view = ClusterView()
        self.listeners: list[Callable[[ClusterView], Awaitable[None]]] = []
        self._channels: dict[str, _Channel] = {}
        self._per_tenant: dict[str, int] = {}
        self._pending: asyncio.Queue[tuple[Job, asyncio.Future[None]]] = asyncio.Queue()
        self._aborts: asyncio.Queue[str] = asyncio.Queue()
        self._submitted_since_refresh = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Take a first look at the cluster and start the background tasks."""
        await self._refresh()
        for loop in (self._submit_loop, self._read_loop, self._monitor_loop, self._abort_loop):
            self._spawn(loop())

    async def stop(self) -> None:
        """Stop the background tasks and remove this router from Redis."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(QueueUnavailable):
            await self.queue.leave()

    async def set_draining(self) -> None:
        """Refuse new requests from now on."""
        self.view.draining = True
        await self._notify()

    @property
    def inflight(self) -> int:
        """Requests this router is streaming now."""
        return len(self._channels)

    def admit(self, tenant: str = "") -> None:
        """Raise a RequestError unless a new request of ``tenant`` can be taken now."""
        if self.view.draining:
            raise RequestError(UNAVAILABLE, "", "router is shutting down", retryable=True)
        if not self.view.redis_ok:
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
        channel = _Channel(job)
        self._channels[job.request_id] = channel
        self._per_tenant[job.tenant] = self._per_tenant.get(job.tenant, 0) + 1
        finished = False
        try:
            await self._submit(job)
            while True:
                event = await channel.events.get()
                yield event
                if is_terminal(event):
                    finished = True
                    return
        finally:
            self._channels.pop(job.request_id, None)
            self._release_tenant(job.tenant)
            if not finished:
                self._aborts.put_nowait(job.request_id)

    def _release_tenant(self, tenant: str) -> None:
        left = self._per_tenant.get(tenant, 0) - 1
        if left > 0:
            self._per_tenant[tenant] = left
        else:
            self._per_tenant.pop(tenant, None)

    async def abort(self, request_id: str) -> bool:
        """Abort a request wherever it runs; True if this router streams it."""
        await self.queue.announce_aborts([request_id])
        return request_id in self._channels

    async def _submit(self, job: Job) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        observability.produced(job, done)
        self._pending.put_nowait((job, done))
        self._submitted_since_refresh += 1
        try:
            await done
        except QueueUnavailable as exc:
            raise RequestError(UNAVAILABLE, "", str(exc), retryable=True) from exc

    async def _submit_loop(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.settings.submit_batch_max and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                await self.queue.submit([job for job, _ in batch])
            except QueueUnavailable as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _read_loop(self) -> None:
        last_id, last_trim = b"0-0", time.monotonic()
        while True:
            try:
                entries = await self.queue.read_replies(last_id, block_ms=1000)
            except QueueUnavailable as exc:
                logger.warning("reply stream unreadable: %s", exc)
                self._fail_all("lost the connection to the queue")
                await self.queue.reset()
                await asyncio.sleep(0.5)
                continue
            for entry_id, reply in entries:
                last_id = entry_id
                channel = self._channels.get(reply.request_id) if reply else None
                if reply is None or channel is None or reply.worker_id in channel.lost_workers:
                    continue
                channel.deliver(reply)
            if entries and time.monotonic() - last_trim > TRIM_EVERY_S:
                last_trim = time.monotonic()
                self._spawn(self._trim_quietly(last_id))

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            await self.queue.heartbeat()
            workers = await self.queue.live_workers()
            depth = await self.queue.queue_depth()
        except QueueUnavailable as exc:
            if self.view.redis_ok:
                logger.warning("queue unreachable: %s", exc)
            self.view.redis_ok = False
        else:
            self.view.redis_ok, self.view.workers, self.view.queue_depth = True, workers, depth
            self._submitted_since_refresh = 0
            self._recover_orphans({w.worker_id for w in workers})
        await self._notify()

    def _recover_orphans(self, live: set[str]) -> None:
        """Continue elsewhere, or end, streams whose worker's heartbeat has stopped."""
        for channel in self._channels.values():
            lost = channel.worker_id
            if not lost or lost in live:
                continue
            channel.lost_workers.add(lost)
            channel.worker_id = ""
            job = channel.job
            if jobs.can_continue(job) and job.attempt + 1 < self.settings.max_attempts:
                channel.job = jobs.continuation_job(job, channel.token_ids)
                logger.warning(
                    "worker %s lost; continuing %s after %d tokens (attempt %d)",
                    lost,
                    job.request_id,
                    len(channel.token_ids),
                    channel.job.attempt,
                )
                self._spawn(self._resubmit(channel))
            else:
                message = f"worker {lost} stopped and the stream cannot be continued"
                channel.events.put(_error_event(UNAVAILABLE, message, True))

    async def _resubmit(self, channel: _Channel) -> None:
        try:
            await self._submit(channel.job)
        except RequestError as exc:
            channel.events.put(_error_event(exc.code, exc.message, True))

    def _fail_all(self, message: str) -> None:
        for channel in self._channels.values():
            channel.events.put(_error_event(UNAVAILABLE, message, True))

    async def _notify(self) -> None:
        for listener in self.listeners:
            await listener(self.view)

    async def _abort_loop(self) -> None:
        """Announce the aborts of abandoned streams, many per round trip."""
        while True:
            batch = [await self._aborts.get()]
            while len(batch) < self.settings.submit_batch_max and not self._aborts.empty():
                batch.append(self._aborts.get_nowait())
            try:
                await self.queue.announce_aborts(batch)
            except QueueUnavailable as exc:
                logger.warning("could not announce %d aborts: %s", len(batch), exc)

    async def _trim_quietly(self, upto: bytes) -> None:
        with contextlib.suppress(QueueUnavailable):
            await self.queue.trim_replies(upto)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
