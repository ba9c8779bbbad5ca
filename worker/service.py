"""The worker's queue loop: claim jobs, run them in the engine, stream replies.

The worker claims at most its free capacity, drops jobs whose deadline has
passed or that were aborted while queued, sends Started once the engine
accepted the request, and acknowledges every job when it ends. Aborts from
routers arrive by pub/sub and reach ``engine.abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Coroutine
from typing import Any, Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import DEADLINE_EXCEEDED, EngineDeadError, RequestError
from qwen_serve.queue.broker import QueueUnavailable, WorkerQueue, now_ms
from qwen_serve.queue.codec import Job, WorkerStatus
from qwen_serve.settings import WorkerSettings
from worker import observability
from worker.probe import write_status
from worker.recovery import Reclaimer, orphaned_by_router
from worker.replies import ReplyWriter

logger = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the service needs of worker.engine.Engine."""

    def run(
        self, request_id: str, job: Job, wanted: Awaitable[bool]
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        """Stream the events of one job (RequestError before the first).

        Nothing is generated, and nothing yielded, if ``wanted`` (awaited once the
        prompt is rendered) is false.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a running request."""

    def num_unfinished(self) -> int:
        """Requests in the engine now."""
        ...

    def model_info(self) -> pb.ModelInfo:
        """The served model."""
        ...

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine has died."""


def error_event(exc: RequestError) -> pb.ChatEvent:
    """The terminal Error event for ``exc`` (recorded on the current job's span)."""
    observability.failed(exc)
    error = pb.Error(code=exc.code, message=exc.detail, retryable=exc.retryable, field=exc.field)
    return pb.ChatEvent(error=error)


def _settle(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` if it still runs, and mark a failure of it as seen."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def job_request(job: Job) -> pb.ChatRequest | pb.GenerateRequest:
    """The request a job carries."""
    return job.chat if job.HasField("chat") else job.generate


class Worker:
    """Claims jobs for one engine until told to drain."""

    def __init__(
        self, settings: WorkerSettings, engine: EngineLike, queue: WorkerQueue, capacity: int
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queue = queue
        self.capacity = capacity
        self.writer = ReplyWriter(queue, settings.worker_id, settings.coalesce_ms / 1000)
        self.status = WorkerStatus(worker_id=settings.worker_id, capacity=capacity)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.jobs: dict[str, Job] = {}
        self.aborted: set[str] = set()
        self.reclaimer = Reclaimer(queue, settings.max_deliveries)
        self.draining = asyncio.Event()
        self.engine_dead = False
        self._slot_free = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        """Serve until drain() is called, then finish or abort in-flight jobs."""
        await self.queue.ensure_group()
        self.status.model.CopyFrom(self.engine.model_info())
        await self._heartbeat()
        for loop in (self.writer.run(), self._heartbeat_loop(), self._abort_loop()):
            self._spawn(loop)
        logger.info("worker %s claiming up to %d jobs", self.settings.worker_id, self.capacity)
        await self._claim_loop()
        await self._finish_inflight()

    def drain(self) -> None:
        """Stop claiming; run() then lets in-flight jobs finish within the grace."""
        self.draining.set()
        self._slot_free.set()

    async def _claim_loop(self) -> None:
        while not self.draining.is_set() and not self.engine_dead:
            free = self.capacity - len(self.running)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                claimed = await self.queue.claim(free, self.settings.claim_block_ms)
            except QueueUnavailable as exc:
                logger.warning("cannot claim jobs: %s", exc)
                await self.queue.reset()
                await asyncio.sleep(0.5)
                continue
            for entry_id, job in claimed:
                self._start(entry_id, job)

    def _start(self, entry_id: bytes, job: Job | None) -> None:
        if job is None:
            self._spawn(self._finish(entry_id))
            return
        work = observability.process(job, entry_id, self._handle(entry_id, job))
        task = asyncio.get_running_loop().create_task(work)
        self.running[job.request_id] = task
        self.jobs[job.request_id] = job
        task.add_done_callback(functools.partial(self._done, job.request_id))

    def _done(self, request_id: str, _task: asyncio.Task[None]) -> None:
        self.running.pop(request_id, None)
        self.jobs.pop(request_id, None)
        self.aborted.discard(request_id)
        self._slot_free.set()

    async def _handle(self, entry_id: bytes, job: Job) -> None:
        rid, stream = job.request_id, job.reply_stream
        try:
            if job.deadline_unix_ms and job.deadline_unix_ms <= now_ms():
                raise RequestError(DEADLINE_EXCEEDED, "", "deadline passed while queued")
            await self._stream(job)
        except RequestError as exc:
            self.writer.put(rid, stream, error_event(exc))
        except QueueUnavailable as exc:
            logger.warning("job %s: queue unavailable: %s", rid, exc)
        except Exception:
            logger.exception("job %s failed", rid)
            self.writer.put(rid, stream, error_event(EngineDeadError("worker failed")))
        finally:
            await self._finish(entry_id)

    async def _stream(self, job: Job) -> None:
        """Run ``job`` in the engine and queue its events, Started first.

        Whether a router aborted the job while it was queued is read from Redis
        while the engine renders the prompt, so the read adds nothing to the
        first token's latency unless rendering is quicker than a round trip.
        """
        rid, stream = job.request_id, job.reply_stream
        wanted = asyncio.ensure_future(self._still_wanted(rid))
        events = observability.generation(job, self.engine.run(rid, job, wanted))
        try:
            timeout = (job.deadline_unix_ms - now_ms()) / 1000 if job.deadline_unix_ms else None
            async with asyncio.timeout(timeout):
                first = await anext(events, None)
                if first is None or rid in self.aborted:
                    logger.info("job %s was aborted before it started", rid)
                    return  # closing the events aborts it in the engine
                request = job_request(job)
                started = pb.Started(
                    request_id=rid,
                    client_request_id=request.client_request_id,
                    model=self.status.model.served_model_name,
                )
                self.writer.put(rid, stream, pb.ChatEvent(started=started))
                self.writer.put(rid, stream, first)
                async for event in events:
                    self.writer.put(rid, stream, event)
        except TimeoutError:
            await self.engine.abort(rid)
            raise RequestError(DEADLINE_EXCEEDED, "", "deadline exceeded") from None
        except EngineDeadError:
            self.engine_dead = True
            raise
        finally:
            _settle(wanted)
            await events.aclose()

    async def _still_wanted(self, request_id: str) -> bool:
        return not await self.queue.is_aborted(request_id)

    async def _finish(self, entry_id: bytes) -> None:
        try:
            await self.queue.finish(entry_id)
        except QueueUnavailable as exc:
            logger.warning("could not acknowledge %r: %s", entry_id, exc)

    async def _abort_loop(self) -> None:
        while True:
            try:
                async for request_id in self.queue.aborts():
                    if request_id in self.running:
                        logger.info("aborting %s", request_id)
                        self.aborted.add(request_id)
                        await self.engine.abort(request_id)
            except QueueUnavailable as exc:
                logger.warning("abort channel lost: %s", exc)
                await asyncio.sleep(0.5)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._heartbeat()
            await self._recover()

    async def _recover(self) -> None:
        """Handle other processes' failures and a Redis outage (see worker/recovery.py)."""
        if self.writer.failing_for() > self.settings.heartbeat_ttl_s:
            await self._abort_all("replies cannot be delivered (Redis unreachable)")
            self.writer.discard()
            return
        for rid in await orphaned_by_router(self.queue, self.jobs):
            logger.info("router of %s is gone; aborting it", rid)
            await self.engine.abort(rid)
        if self.draining.is_set() or self.engine_dead:
            return
        try:
            adopted = await self.reclaimer.sweep(self.capacity - len(self.running))
        except QueueUnavailable as exc:
            logger.warning("cannot sweep orphaned jobs: %s", exc)
            return
        observability.reclaimed(len(adopted))
        for entry_id, job in adopted:
            self._start(entry_id, job)

    async def _abort_all(self, why: str) -> None:
        if self.running:
            logger.warning("aborting %d running jobs: %s", len(self.running), why)
        for rid in list(self.running):
            await self.engine.abort(rid)

    async def _heartbeat(self) -> None:
        engine_ok = await self._engine_healthy()
        self.status.running = self.engine.num_unfinished() if engine_ok else 0
        self.status.draining = self.draining.is_set()
        redis_ok = True
        try:
            await self.queue.heartbeat(self.status)
        except QueueUnavailable as exc:
            redis_ok = False
            logger.warning("heartbeat failed: %s", exc)
        write_status(
            self.settings.status_file,
            worker_id=self.settings.worker_id,
            engine_ok=engine_ok,
            redis_ok=redis_ok,
            draining=self.status.draining,
            running=self.status.running,
        )

    async def _engine_healthy(self) -> bool:
        try:
            await self.engine.check_health()
        except EngineDeadError:
            if not self.engine_dead:
                logger.error("engine health check failed; draining")
            self.engine_dead = True
            self.drain()
            return False
        return True

    async def _finish_inflight(self) -> None:
        if self.running:
            logger.info("draining %d in-flight jobs", len(self.running))
            _, late = await asyncio.wait(
                list(self.running.values()), timeout=self.settings.drain_grace_s
            )
            await self._abort_all("drain grace is over")
            if late:
                await asyncio.wait(late, timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.writer.flush(), timeout=5)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(QueueUnavailable):
            await self.queue.leave()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
