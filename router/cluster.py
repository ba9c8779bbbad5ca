"""The router's view of the cluster, and the two loops that keep it and its heartbeat.

One loop writes this router's heartbeat: workers abort the jobs of a router
whose heartbeat is older than the TTL, so nothing slower may delay it. The
monitor looks once a heartbeat interval at Redis, the live workers and the
queue depth (admission and health read the view), continues the streams of
workers that are gone (router/recovery.py), and moves placed jobs that wait
on a busy, stalled or gone worker to the shared stream (router/placement.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError
from qwen_serve.outage import every
from qwen_serve.queue.broker import QueueUnavailable
from qwen_serve.queue.codec import WorkerStatus
from router import observability
from router.channels import Channel

if TYPE_CHECKING:
    from router.dispatcher import Dispatcher

logger = logging.getLogger(__name__)


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


class ClusterMonitor:
    """The heartbeat and monitor loops of one router, and the view they keep."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.view = ClusterView()
        self.listeners: list[Callable[[ClusterView], Awaitable[None]]] = []
        self.submitted_since_refresh = 0
        """Jobs queued since the view's queue depth was read (admission counts them)."""

    @property
    def queue_depth(self) -> int:
        """Unclaimed jobs: as last read, plus those this router queued since."""
        return self.view.queue_depth + self.submitted_since_refresh

    async def heartbeat_loop(self) -> None:
        """This router's heartbeat, apart from the monitor's slower round trips."""
        dispatcher = self.dispatcher
        while True:
            await asyncio.sleep(dispatcher.settings.heartbeat_interval_s)
            with contextlib.suppress(QueueUnavailable):  # the monitor's probe tracks outages
                await dispatcher.queue.heartbeat()

    async def monitor_loop(self) -> None:
        """Refresh the view once a heartbeat interval (a late round widens liveness)."""
        dispatcher = self.dispatcher
        await every(dispatcher.settings.heartbeat_interval_s, dispatcher.outage, self.refresh)

    async def refresh(self) -> None:
        """Look at Redis, the workers and the queue; act on what changed; tell listeners."""
        dispatcher, view = self.dispatcher, self.view
        queue, outage = dispatcher.queue, dispatcher.outage
        began = time.monotonic()
        try:
            await queue.heartbeat()  # also the probe: a slow answer widens liveness
            dispatcher.redis_answered(took=time.monotonic() - began)
            workers = await queue.live_workers(outage.grace_ms())
            depth = await queue.queue_depth([w.worker_id for w in workers])
            await dispatcher.admission.refresh()
        except QueueUnavailable as exc:
            if view.redis_ok:
                logger.warning("queue unreachable: %s", exc)
            outage.failed()
            view.redis_ok = False
            view.riding_out = outage.reached and not outage.beyond_bound()
        else:
            view.redis_ok, view.riding_out = True, False
            view.workers, view.queue_depth = workers, depth
            self.submitted_since_refresh = 0
            dispatcher.placer.refreshed(workers)
            live = {w.worker_id for w in workers}
            dispatcher.recovery.recover_orphans(live)
            dispatcher.tasks.spawn(self._move_overdue(live))
        await self.notify()

    async def notify(self) -> None:
        """Hand the view to every listener (health)."""
        for listener in self.listeners:
            await listener(self.view)

    async def _move_overdue(self, live: set[str]) -> None:
        """Move placed jobs that wait on a busy, stalled or gone worker to the shared stream."""
        dispatcher = self.dispatcher
        placer = dispatcher.placer
        waiting = placer.overdue(dispatcher.channels.values(), live)
        if not waiting:
            return
        try:
            queued = await dispatcher.queue.undelivered([c.entry_id for c, _ in waiting])
        except QueueUnavailable:
            return  # the next refresh looks again
        for (channel, gone), unclaimed in zip(waiting, queued, strict=True):
            if not channel.placed_on or channel.worker_id:
                continue  # moved by an earlier round, or its worker answered meanwhile
            if gone or unclaimed or placer.stalled(channel):
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
                placer.moved(channel)
                dispatcher.tasks.spawn(self._move_to_shared(channel))

    async def _move_to_shared(self, channel: Channel) -> None:
        """Queue a placed job on the shared stream and delete the placed entry. Should its
        worker claim the entry meanwhile, the attempt's lease lets only one of the two run."""
        placed = channel.entry_id
        try:
            channel.entry_id, channel.mark = await self.dispatcher.submit(channel.job)
            await self.dispatcher.queue.drop(placed)
        except (RequestError, QueueUnavailable) as exc:
            logger.warning(
                "could not move job %s to the shared stream: %s", channel.job.request_id, exc
            )
            return
        observability.placement("moved")
