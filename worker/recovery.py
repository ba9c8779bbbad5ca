"""What a worker does about other processes' failures.

- Jobs claimed by a worker whose heartbeat stopped: an unstarted one is taken
  over and run here; a started one is left to its router, which continues the
  stream on another worker (it is told which worker was lost); one delivered
  more than ``max_deliveries`` times goes to the dead-letter stream and its
  client gets a terminal error.
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
    """Sweeps the pending entries of dead workers."""

    def __init__(self, queue: WorkerQueue, max_deliveries: int) -> None:
        self.queue = queue
        self.max_deliveries = max_deliveries

    async def sweep(self, free: int) -> list[tuple[bytes, Job]]:
        """Take over up to ``free`` orphaned jobs; returns those to run here."""
        if free <= 0:
            return []
        live = {w.worker_id for w in await self.queue.live_workers()}
        orphans = await self.queue.orphaned(live, free)
        if not orphans:
            return []
        previous = {entry: (consumer, count) for consumer, entry, count in orphans}
        to_run: list[tuple[bytes, Job]] = []
        for entry_id, job in await self.queue.take_over(list(previous)):
            dead_worker, deliveries = previous[entry_id][0], previous[entry_id][1] + 1
            if await self._adopt(entry_id, job, dead_worker, deliveries):
                assert job is not None
                to_run.append((entry_id, job))
        return to_run

    async def _adopt(
        self, entry_id: bytes, job: Job | None, dead_worker: str, deliveries: int
    ) -> bool:
        """Decide what happens to one taken-over entry; True to run it here."""
        if job is None:
            await self.queue.dead_letter(entry_id, None, "malformed entry")
            return False
        rid = job.request_id
        if await self.queue.is_started(rid):
            logger.info(
                "job %s was streaming on lost worker %s; its router continues it", rid, dead_worker
            )
            await self.queue.send(
                [(job.reply_stream, Reply(request_id=rid, worker_id=dead_worker))]
            )
            await self.queue.finish(entry_id)
            return False
        if deliveries > self.max_deliveries:
            logger.warning("job %s delivered %d times; dead-lettering it", rid, deliveries)
            await self.queue.dead_letter(entry_id, job, f"delivered {deliveries} times")
            observability.dead_lettered()
            error = pb.Error(
                code=ABORTED,
                message=f"the job failed on {deliveries - 1} workers and was dead-lettered",
                retryable=False,
            )
            reply = Reply(
                request_id=rid, worker_id=self.queue.worker_id, events=[pb.ChatEvent(error=error)]
            )
            await self.queue.send([(job.reply_stream, reply)])
            return False
        logger.info(
            "taking over job %s from lost worker %s (delivery %d)", rid, dead_worker, deliveries
        )
        return True


async def orphaned_by_router(queue: WorkerQueue, jobs: Mapping[str, Job]) -> list[str]:
    """Request ids among ``jobs`` whose router has stopped heartbeating."""
    if not jobs:
        return []
    try:
        live = await queue.live_routers()
    except QueueUnavailable:
        return []
    return [rid for rid, job in jobs.items() if job.router_id not in live]
