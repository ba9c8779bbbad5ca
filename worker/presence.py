"""The worker's presence: its heartbeat in Redis, its status file, its engine's health.

Once a heartbeat interval the worker checks its engine (a dead engine drains the
worker, which then exits to be restarted), publishes its ``WorkerStatus`` (running
requests, draining, the served model; routers read it for liveness, admission and
placement) and writes the status file the Kubernetes probes read
(``worker/probe.py``). A slow heartbeat answer counts as a short Redis outage
(``qwen_serve/outage.py``), so liveness checks after it widen their window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from qwen_serve.errors import EngineDeadError
from qwen_serve.queue.broker import QueueUnavailable
from worker.probe import status_path, write_status

if TYPE_CHECKING:
    from worker.service import Worker

logger = logging.getLogger(__name__)


class Presence:
    """The heartbeat of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def loop(self) -> None:
        """Beat once a heartbeat interval, forever (apart from the guard's round trips)."""
        while True:
            await asyncio.sleep(self.worker.settings.heartbeat_interval_s)
            await self.beat()

    async def beat(self) -> None:
        """Check the engine, publish the status, write the status file."""
        worker = self.worker
        status = worker.status
        engine_ok = await self._engine_healthy()
        status.running = worker.engine.num_unfinished() if engine_ok else 0
        status.draining = worker.draining.is_set()
        redis_ok, began = True, time.monotonic()
        try:
            await worker.queue.heartbeat(status)
            worker.outage.succeeded(took=time.monotonic() - began)
        except QueueUnavailable as exc:
            redis_ok = False
            worker.redis_failed("heartbeat failed", exc)
        write_status(
            status_path(worker.settings),
            worker_id=worker.settings.worker_id,
            engine_ok=engine_ok,
            redis_ok=redis_ok,
            draining=status.draining,
            running=status.running,
        )

    async def _engine_healthy(self) -> bool:
        worker = self.worker
        try:
            await worker.engine.check_health()
        except EngineDeadError:
            if not worker.engine_dead:
                logger.error("engine health check failed; draining")
            worker.engine_dead = True
            worker.drain()
            return False
        return True
