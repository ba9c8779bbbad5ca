"""What a worker does about other processes' failures.

- Jobs pending on a worker whose heartbeat stopped: an unleased one is taken
  over and run here; a leased one (it was streaming) is ended by telling its
  router the attempt is lost, and the router continues the stream on another
  worker; one delivered more than ``max_deliveries`` times goes to the
  dead-letter stream and its client gets a terminal error.
- Jobs pending on a live worker but untouched for ``reclaim_unstarted_s``
  (running entries are touched once a heartbeat): an unleased one was
  claimed and never started (a lost claim answer, a wedged claim) and is
  taken over; a leased one belongs to a stalled worker and is given back.
- Jobs of a router whose heartbeat stopped are aborted: nobody reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import ABORTED
from qwen_serve.queue.broker import QueueUnavailable, WorkerQueue
from qwen_serve.queue.codec import Job, Reply
from worker import observability

logger = logging.getLogger(__name__)


class Reclaimer:
    """Sweeps the pending entries of dead workers and stalled entries of live ones."""

    def __init__(self, queue: WorkerQueue, max_deliveries: int, unstarted_s: float) -> None:
        self.queue = queue
        self.max_deliveries = max_deliveries
        self.unstarted_ms = int(unstarted_s * 1000)

    async def sweep(self, free: int, grace_ms: int = 0) -> list[tuple[bytes, Job]]:
        """Take over up to ``free`` orphaned or stalled jobs; returns those to run here."""
        if free <= 0:
            return []
        live = {w.worker_id for w in await self.queue.live_workers(grace_ms)}
        found = {
            entry: (consumer, count, False)
            for consumer, entry, count in await self.queue.orphaned(live, free)
        }
        if len(found) < free:
            for consumer, entry, count in await self.queue.stalled(self.unstarted_ms, free):
                if consumer in live:
                    found.setdefault(entry, (consumer, count, True))
        to_run: list[tuple[bytes, Job]] = []
        for stalled in (False, True):
            ids = [entry for entry, (_, _, s) in found.items() if s is stalled]
            idle = self.unstarted_ms if stalled else 0
            for entry_id, job in await self.queue.take_over(ids[: free - len(to_run)], idle):
                previous, deliveries, _ = found[entry_id]
                if await self._adopt(entry_id, job, previous, deliveries + 1, stalled):
                    assert job is not None
                    to_run.append((entry_id, job))
        return to_run

    async def _adopt(
        self, entry_id: bytes, job: Job | None, previous: str, deliveries: int, stalled: bool
    ) -> bool:
        """Decide what happens to one taken-over entry; True to run it here."""
        if job is None:
            await self.queue.dead_letter(entry_id, None, "malformed entry")
            return False
        rid = job.request_id
        lease = await self.queue.lease_of(rid, job.attempt)
        if lease is not None and (lease.done or lease.fenced):
            await self.queue.finish(entry_id)  # an attempt that ended or was replaced
            return False
        if lease is not None and stalled:
            logger.info("job %s runs on stalled worker %s; giving it back", rid, lease.worker_id)
            await self.queue.hand_back(entry_id, lease.worker_id)
            return False
        if lease is not None:
            logger.info(
                "job %s was streaming on lost worker %s; its router continues it", rid, previous
            )
            lost = Reply(request_id=rid, worker_id=lease.worker_id or previous, attempt=job.attempt)
            lost.attempt_lost = True
            await self.queue.send([(job.reply_stream, lost)], [(entry_id, None)])
            return False
        if deliveries > self.max_deliveries:
            await self._dead_letter(entry_id, job, deliveries)
            return False
        why = "stalled on" if stalled else "lost"
        logger.info(
            "taking over job %s, %s worker %s (delivery %d)", rid, why, previous, deliveries
        )
        return True

    async def _dead_letter(self, entry_id: bytes, job: Job, deliveries: int) -> None:
        rid = job.request_id
        logger.warning("job %s delivered %d times; dead-lettering it", rid, deliveries)
        await self.queue.dead_letter(entry_id, job, f"delivered {deliveries} times")
        observability.dead_lettered()
        error = pb.Error(
            code=ABORTED,
            message=f"the job failed on {deliveries - 1} workers and was dead-lettered",
            retryable=False,
        )
        reply = Reply(
            request_id=rid,
            worker_id=self.queue.worker_id,
            attempt=job.attempt,
            events=[pb.ChatEvent(error=error)],
        )
        await self.queue.send([(job.reply_stream, reply)])


async def orphaned_by_router(
    queue: WorkerQueue, jobs: Mapping[bytes, Job], grace_ms: int = 0
) -> list[bytes]:
    """Keys of ``jobs`` whose router has stopped heartbeating."""
    if not jobs:
        return []
    try:
        live = await queue.live_routers(grace_ms)
    except QueueUnavailable:
        return []
    return [key for key, job in jobs.items() if job.router_id not in live]
