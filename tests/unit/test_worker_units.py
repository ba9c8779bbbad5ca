"""The worker's queue logic on a real Redis, with a scripted stand-in for the engine.

These tests pin down what the worker does around the engine (leases, acknowledgements,
Redis failures); the stand-in only streams fixed events. Tests that claim to test the
system run the real vLLM engine (test_e2e_*, tests/faults).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import (
    AttemptRef,
    LeaseCheck,
    QueueUnavailable,
    RouterQueue,
    WorkerQueue,
    connect,
    router_queue,
)
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import WorkerSettings, new_id
from router import jobs
from tests.support.calls import chat
from tests.support.scripted import ScriptedEngine
from worker.service import Worker


class FlakyQueue(WorkerQueue):
    """A WorkerQueue whose first ``failures`` lease calls find Redis unreachable."""

    failures = 0

    async def acquire(self, ref: AttemptRef) -> LeaseCheck:
        if self.failures:
            self.failures -= 1
            raise QueueUnavailable("redis unavailable: scripted timeout")
        return await super().acquire(ref)


@pytest.fixture
async def router(redis_url: str) -> AsyncIterator[RouterQueue]:
    settings = WorkerSettings(redis_url=redis_url, key_prefix=new_id("qs-units"))
    queue = router_queue(settings, "router-units")
    try:
        yield queue
    finally:
        await queue.close()


async def _events(router: RouterQueue, timeout: float = 60) -> list[pb.ChatEvent]:
    events: list[pb.ChatEvent] = []
    last = b"0-0"
    async with asyncio.timeout(timeout):
        while not events or events[-1].WhichOneof("event") not in ("usage", "error"):
            for entry_id, reply in await router.read_replies(last, block_ms=200):
                last = entry_id
                assert reply is not None
                events.extend(reply.events)
    return events


async def test_a_lease_that_redis_cannot_take_leaves_the_job_pending_until_it_runs(
    redis_url: str, router: RouterQueue, tmp_path: Path
) -> None:
    """Redis failing past the outage bound while the job's lease is taken: the job is not
    acknowledged (the drain race of issue 15: it used to be, silently), and the worker
    finds it in its pending list and runs it once Redis answers."""
    settings = WorkerSettings(
        redis_url=redis_url,
        key_prefix=router.keys.prefix,
        heartbeat_interval_s=0.2,
        heartbeat_ttl_s=2.0,
        redis_outage_s=0.3,
        reclaim_unstarted_s=5.0,
        status_file=str(tmp_path / "status.json"),
    )
    queue = FlakyQueue(connect(settings, 100), Keys(settings.key_prefix), "w-units", 2.0)
    queue.failures = 3
    engine = ScriptedEngine()
    worker = Worker(settings, engine, queue, capacity=2)
    job = jobs.make_job(
        chat(), router_id="router-units", reply_stream=router.reply_stream,
        deadline_unix_ms=0, trace={},
    )  # fmt: skip
    serving = asyncio.create_task(worker.run())
    try:
        await router.heartbeat()
        await router.submit([job])
        events = await _events(router)
    finally:
        worker.drain()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 30)
        await queue.close()
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["started", "delta", "finished", "usage"], kinds
    assert engine.runs == [job.request_id] and queue.failures == 0
    assert await WorkerQueue(router.redis, router.keys, "w-units", 2.0).pending_count() == 0
