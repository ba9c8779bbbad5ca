"""What a worker checks once a heartbeat, so nothing is lost or run twice.

- **Aborts**: the pub/sub subscription (the fast path).
- **Audit**: the abort markers and leases of what runs here are read again
  (one round trip, which also renews the idle time of their job entries). A
  marker aborts the run even if the pub/sub message was lost (a Redis
  restart); a lease now held by another worker, or fenced by the router,
  means the attempt moved on: the run is aborted here and nothing more of it
  is sent (fencing).
- **Own pending entries**: jobs Redis delivered here whose claim answer never
  arrived (a timeout, a stall) are started.
- **Outage**: replies that cannot be written for longer than the outage
  bound give up what runs here (the routers have failed those streams).
- **Other processes**: taking over jobs of lost workers and stalled entries,
  aborting jobs of lost routers (worker/recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from qwen_serve.queue.broker import QueueUnavailable
from qwen_serve.queue.codec import Lease
from worker import observability
from worker.recovery import Reclaimer, orphaned_by_router
from worker.runs import Run

if TYPE_CHECKING:
    from worker.service import Worker

logger = logging.getLogger(__name__)

GIVE_UP_MARGIN_HEARTBEATS = 2
RESUBSCRIBE_S = 0.5


class Guard:
    """The once-a-heartbeat checks of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.settings
        self.reclaimer = Reclaimer(
            worker.queue, settings.max_deliveries, settings.reclaim_unstarted_s
        )
        self.give_up_after_s = (
            settings.redis_outage_s + GIVE_UP_MARGIN_HEARTBEATS * settings.heartbeat_interval_s
        )
        self.own_check_needed = True

    async def tick(self) -> None:
        """One round of checks (after each heartbeat)."""
        worker = self.worker
        if worker.writer.failing_for() > self.give_up_after_s:
            await self.give_up("replies cannot be written (Redis unreachable)")
            return
        try:
            await self.audit()
            await self.recover_own()
            await self._abort_orphans_of_routers()
            if not worker.draining.is_set() and not worker.engine_dead:
                adopted = await self.reclaimer.sweep(worker.free, self._grace_ms())
                observability.reclaimed(len(adopted))
                for entry_id, job in adopted:
                    worker.start(entry_id, job)
        except QueueUnavailable as exc:
            worker.redis_failed("checks skipped", exc)

    def _grace_ms(self) -> int:
        return self.worker.outage.grace_ms()

    async def abort_loop(self) -> None:
        """Honour aborts announced on the pub/sub channel (subscribing again after a
        failure); the audit catches any announced while the subscription was down."""
        while True:
            try:
                async for request_id in self.worker.queue.aborts():
                    await self._abort_hint(request_id)
            except QueueUnavailable as exc:
                self.worker.redis_failed("abort subscription lost; subscribing again", exc)
                await asyncio.sleep(RESUBSCRIBE_S)

    async def _abort_hint(self, request_id: str) -> None:
        """A router announced an abort of ``request_id``: honour it for its own tenant."""
        for run in [r for r in self.worker.running.values() if r.request_id == request_id]:
            try:
                if await self.worker.queue.is_aborted(request_id, run.job.tenant):
                    await self.worker.abort_run(run, "aborted by its router")
            except QueueUnavailable:
                return  # the next audit reads the marker again

    async def audit(self) -> None:
        """Honour abort markers and lost leases of the runs holding a lease."""
        runs = [r for r in self.worker.running.values() if r.leased and not r.lost]
        if not runs:
            return
        checks = await self.worker.queue.audit([r.ref for r in runs])
        for run, check in zip(runs, checks, strict=True):
            if check.holder is not None:
                await self.fence_out(run, check.holder)
            elif check.aborted:
                await self.worker.abort_run(run, "abort marker")

    async def fence_out(self, run: Run, holder: Lease) -> None:
        """The attempt is no longer this worker's: stop it here, send nothing more."""
        why = "its router fenced it" if holder.fenced else f"{holder.worker_id or '?'} holds it"
        logger.warning(
            "lost attempt %d of %s (%s); aborting it here", run.attempt, run.request_id, why
        )
        await self.hand_over(run)

    async def hand_over(self, run: Run) -> None:
        """End ``run`` here without a terminal event; its router continues it elsewhere."""
        if run.lost:
            return
        self.hand_over_unstarted(run)
        await self.worker.engine.abort(run.engine_id)

    def hand_over_unstarted(self, run: Run) -> None:
        """Tell the router ``run``'s attempt ends here; nothing more of it is sent."""
        run.lost = True
        self.worker.writer.lost(run.key, run.job.reply_stream)

    async def hand_over_all(self, why: str) -> None:
        """Hand every run over to other workers (drain grace over)."""
        runs = [r for r in self.worker.running.values() if not r.lost]
        if runs:
            logger.warning("handing %d running jobs over: %s", len(runs), why)
        for run in runs:
            await self.hand_over(run)

    async def give_up(self, why: str) -> None:
        """Abort everything running; leave the jobs pending (run again, or failed by
        their routers, once Redis is back)."""
        worker = self.worker
        runs = [r for r in worker.running.values() if not r.lost]
        if runs:
            logger.warning("aborting %d running jobs: %s", len(runs), why)
        for run in runs:
            run.lost = run.keep_entry = True
            await worker.engine.abort(run.engine_id)
        worker.writer.discard()
        worker.ending.clear()
        self.own_check_needed = True

    async def recover_own(self) -> None:
        """Start the entries pending on this worker that nothing here runs."""
        worker = self.worker
        if not self.own_check_needed:
            known = len(worker.running) + len(worker.ending)
            if await worker.queue.pending_count() <= known:
                return
        entries = await worker.queue.own_pending(2 * worker.capacity)
        self.own_check_needed = False
        for entry_id, job in entries:
            if entry_id in worker.running or entry_id in worker.ending:
                continue
            if worker.free <= 0:
                self.own_check_needed = True
                return
            logger.warning(
                "job entry %s was delivered here but not started (its claim answer was lost); "
                "starting it",
                entry_id.decode(),
            )
            worker.start(entry_id, job)

    async def _abort_orphans_of_routers(self) -> None:
        jobs = {r.entry_id: r.job for r in self.worker.running.values() if not r.lost}
        for entry_id in await orphaned_by_router(self.worker.queue, jobs, self._grace_ms()):
            run = self.worker.running.get(entry_id)
            if run is not None:
                await self.worker.abort_run(run, "its router is gone")
