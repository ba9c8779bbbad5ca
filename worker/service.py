"""The worker's queue loop: claim jobs, run them in the engine, stream replies.

The worker claims at most its free capacity, drops jobs whose deadline has
passed, and takes the attempt's lease before the engine generates (reading
whether it was aborted in the same round trip, while the engine renders the
prompt): a job whose lease another worker holds, or that a router fenced,
is not run here. It sends Started once the engine accepted the request, and
acknowledges every job in the write of its last events. Aborts from routers
arrive by pub/sub, and every heartbeat re-reads the abort markers and leases
of what runs here (worker/guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Protocol

from qwen_serve.aio import Tasks
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import DEADLINE_EXCEEDED, INTERNAL, EngineDeadError, RequestError, readable
from qwen_serve.outage import Outage, every
from qwen_serve.queue.broker import LeaseCheck, QueueUnavailable, WorkerQueue, now_ms
from qwen_serve.queue.codec import Job, WorkerStatus, job_priority
from qwen_serve.queue.keys import PRIORITY_HIGH
from qwen_serve.settings import WorkerSettings
from worker import observability
from worker.guard import Guard
from worker.presence import Presence
from worker.probe import remove_status, status_path
from worker.replies import ReplyWriter
from worker.runs import Run, aborted_events

logger = logging.getLogger(__name__)

CLAIM_RETRY_S = 0.5


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
        self.running: dict[bytes, Run] = {}
        """Runs by job entry id, until their task ends."""
        self.ending: set[bytes] = set()
        """Entries whose acknowledgement the writer has not written yet."""
        self.outage = Outage(settings.redis_outage_s, settings.heartbeat_ttl_s)
        self.guard = Guard(self)
        self.presence = Presence(self)
        self.draining = asyncio.Event()
        self.engine_dead = False
        self._slot_free = asyncio.Event()
        self._last_high: float | None = None
        """When this worker last started a HIGH job (monotonic); None: never."""
        self.tasks = Tasks(f"worker {settings.worker_id}")

    @property
    def free(self) -> int:
        """Jobs this worker may claim now."""
        return self.capacity - len(self.running)

    @property
    def reserve(self) -> int:
        """Slots only HIGH priority jobs may take: ``high_priority_reserve`` from this
        worker's first HIGH job until none came for ``high_priority_reserve_hold_s``.

        Without HIGH traffic every slot runs NORMAL and LOW jobs: a slot kept for nobody
        costs a stream at full concurrency a whole request's wait.
        """
        if self._last_high is None:
            return 0
        if time.monotonic() - self._last_high > self.settings.high_priority_reserve_hold_s:
            return 0
        return max(0, min(self.settings.high_priority_reserve, self.capacity - 1))

    async def run(self) -> None:
        """Serve until drain() is called, then finish or hand over in-flight jobs."""
        await self.queue.ensure_group()
        self.status.model.CopyFrom(self.engine.model_info())
        await self.presence.beat()
        self.tasks.loop("reply writer", self.writer.run)
        self.tasks.loop("heartbeat", self.presence.loop)
        self.tasks.loop("guard", self._guard_loop)
        self.tasks.loop("abort subscription", self.guard.abort_loop)
        logger.info("worker %s claiming up to %d jobs", self.settings.worker_id, self.capacity)
        await self._claim_loop()
        await self._finish_inflight()
        remove_status(status_path(self.settings))

    def drain(self) -> None:
        """Stop claiming; run() then lets in-flight jobs finish within the grace."""
        self.draining.set()
        self._slot_free.set()

    async def _claim_loop(self) -> None:
        while not self.draining.is_set() and not self.engine_dead:
            if self.free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                claimed = await self.queue.claim(
                    self.free, self.settings.claim_block_ms, others=self.free - self.reserve
                )
            except QueueUnavailable as exc:
                # The answer may have been lost after Redis delivered jobs: they are
                # pending here, and the guard starts them once Redis answers again.
                self.redis_failed("cannot claim jobs", exc)
                self.guard.own_check_needed = True
                await asyncio.sleep(CLAIM_RETRY_S)
                continue
            if self.outage.succeeded():
                logger.info("Redis answers again")
            if claimed:
                observability.claimed(len(claimed))
            for entry_id, job in claimed:
                self.start(entry_id, job)
            if self.guard.own_check_needed:
                await self.guard.recover_own()

    def start(self, entry_id: bytes, job: Job | None) -> None:
        """Run one claimed entry (a malformed one is acknowledged and dropped)."""
        if entry_id in self.running or entry_id in self.ending:
            return
        if job is None:
            self.tasks.spawn(self._acknowledge(entry_id))
            return
        if job_priority(job) == PRIORITY_HIGH:
            self._last_high = time.monotonic()
        run = Run(entry_id, job)
        work = observability.process(job, entry_id, self._handle(run))
        run.task = asyncio.get_running_loop().create_task(work)
        self.running[entry_id] = run
        run.task.add_done_callback(functools.partial(self._done, run))

    def _done(self, run: Run, _task: asyncio.Task[None]) -> None:
        self.running.pop(run.entry_id, None)
        self._slot_free.set()

    async def _handle(self, run: Run) -> None:
        try:
            if run.job.deadline_unix_ms and run.job.deadline_unix_ms <= now_ms():
                raise RequestError(DEADLINE_EXCEEDED, "", "deadline passed while queued")
            await self._stream(run)
        except RequestError as exc:
            self.emit(run, error_event(exc))
        except QueueUnavailable as exc:
            # Redis stayed away longer than the outage bound before the lease was
            # taken: leave the job pending (it is run again, or its router fails it).
            logger.warning("job %s: redis unreachable, left pending: %s", run.request_id, exc)
            run.keep_entry = True
        except Exception as exc:
            # Engine failures arrive as RequestError (worker/engine.py): this is a bug in
            # preparing or relaying the request, which a retry would only repeat.
            logger.exception("job %s failed", run.request_id)
            failure = RequestError(INTERNAL, "", f"the worker failed: {readable(exc)}")
            self.emit(run, error_event(failure))
        finally:
            self._settle_entry(run)

    def _settle_entry(self, run: Run) -> None:
        """Acknowledge (or keep, or hand back) the run's entry once its events are written."""
        if run.keep_entry:
            return
        if run.hand_back_to:
            self.tasks.spawn(self._hand_back(run))
            return
        self.ending.add(run.entry_id)
        owned = not run.lost
        self.writer.end(
            run.key if owned else None,
            run.entry_id,
            run.ref if owned and run.leased else None,
            functools.partial(self.ending.discard, run.entry_id),
        )

    def emit(self, run: Run, event: pb.ChatEvent) -> None:
        """Queue an event of ``run`` for its router (nothing once the attempt is lost)."""
        if not run.lost:
            self.writer.put(run.request_id, run.job.reply_stream, event, run.attempt)

    async def _stream(self, run: Run) -> None:
        """Run the job in the engine and queue its events, Started first.

        The lease is taken (and the abort marker read) while the engine renders the
        prompt, so it adds nothing to the first token's latency unless rendering is
        quicker than a round trip.
        """
        job = run.job
        wanted = asyncio.ensure_future(self._wanted(run))
        events = observability.generation(job, self.engine.run(run.engine_id, job, wanted))
        try:
            timeout = (job.deadline_unix_ms - now_ms()) / 1000 if job.deadline_unix_ms else None
            async with asyncio.timeout(timeout):
                first = await anext(events, None)
                if first is None or run.aborted:
                    self._not_started(run)
                    return  # closing the events aborts it in the engine
                started = pb.Started(
                    request_id=job.request_id,
                    client_request_id=job_request(job).client_request_id,
                    model=self.status.model.served_model_name,
                )
                self.emit(run, pb.ChatEvent(started=started))
                self.emit(run, first)
                async for event in events:
                    self.emit(run, event)
        except TimeoutError:
            await self.engine.abort(run.engine_id)
            raise RequestError(DEADLINE_EXCEEDED, "", "deadline exceeded") from None
        except EngineDeadError:
            self.engine_dead = True
            raise
        finally:
            _settle(wanted)
            await events.aclose()

    def _not_started(self, run: Run) -> None:
        if run.aborted and run.leased:
            logger.info("job %s was aborted before it started", run.request_id)
            for event in aborted_events(run.job):
                self.emit(run, event)

    async def _wanted(self, run: Run) -> bool:
        """Take the attempt's lease; False if it was aborted or is not this worker's."""
        check = await self._acquire(run)
        if check.holder is None and check.again:
            # It ran here before and its end was lost with Redis state (or it was given
            # up): running it again would repeat output. Its router continues it.
            logger.warning("job %s attempt %d ran here before; handing it over", *run.key)
            run.leased = True
            self.guard.hand_over_unstarted(run)
            return False
        if check.holder is None:
            run.leased = True
            run.aborted = run.aborted or check.aborted
            return not run.aborted
        holder, run.lost = check.holder, True
        elsewhere = holder.worker_id != self.settings.worker_id
        if (
            elsewhere
            and not (holder.done or holder.fenced)
            and holder.entry_id == run.entry_id.decode()
        ):
            run.hand_back_to = holder.worker_id  # it runs this very entry
        why = "fenced by its router" if holder.fenced else "done" if holder.done else "leased"
        logger.info(
            "job %s attempt %d is not run here: %s (%s)",
            run.request_id,
            run.attempt,
            why,
            holder.worker_id or "-",
        )
        return False

    async def _acquire(self, run: Run) -> LeaseCheck:
        """``queue.acquire``, retried through a Redis outage up to its bound.

        After a failed try the lease may be ours from that very try: not "again".
        """
        outage = Outage(self.settings.redis_outage_s, self.settings.heartbeat_ttl_s)
        while True:
            try:
                check = await self.queue.acquire(run.ref)
            except QueueUnavailable:
                outage.failed()
                if outage.beyond_bound():
                    raise
                await asyncio.sleep(CLAIM_RETRY_S)
                continue
            return check._replace(again=False) if outage.ongoing else check

    async def _acknowledge(self, entry_id: bytes) -> None:
        try:
            await self.queue.finish(entry_id)
        except QueueUnavailable as exc:
            logger.warning("could not acknowledge %r: %s", entry_id, exc)

    async def _hand_back(self, run: Run) -> None:
        try:
            await self.queue.hand_back(run.entry_id, run.hand_back_to)
        except QueueUnavailable as exc:
            logger.warning("could not hand %r back: %s", run.entry_id, exc)

    async def abort_run(self, run: Run, why: str) -> None:
        """Abort one run in the engine; it ends with Finished (abort)."""
        if run.aborted:
            return
        logger.info("aborting %s (%s)", run.request_id, why)
        run.aborted = True
        await self.engine.abort(run.engine_id)

    async def _guard_loop(self) -> None:
        """The guard's checks, once a heartbeat interval (apart from the heartbeat itself,
        which their round trips must not delay)."""
        await every(self.settings.heartbeat_interval_s, self.outage, self.guard.tick)

    def redis_failed(self, what: str, exc: QueueUnavailable) -> None:
        """Note a failed Redis call; log it at the start of an outage only."""
        level = logging.DEBUG if self.outage.ongoing else logging.WARNING
        logger.log(level, "%s: %s", what, exc)
        self.outage.failed()

    async def _finish_inflight(self) -> None:
        if self.running:
            logger.info("draining %d in-flight jobs", len(self.running))
            _, late = await asyncio.wait(
                [r.task for r in self.running.values() if r.task is not None],
                timeout=self.settings.drain_grace_s,
            )
            await self.guard.hand_over_all("drain grace is over")
            if late:
                await asyncio.wait(late, timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.writer.flush(), timeout=5)
        await self.tasks.cancel_all()
        with contextlib.suppress(QueueUnavailable):
            await self.queue.leave()
