"""The router's Dispatcher and the worker's Worker in one process, on a real Redis, with
the scripted engine: a request's path through admission, the queue, the worker and
the reply stream, without gRPC or vLLM (those are in tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RESOURCE_EXHAUSTED, UNAVAILABLE, RequestError
from qwen_serve.queue.broker import router_queue, worker_queue
from qwen_serve.queue.codec import Job
from qwen_serve.settings import RouterSettings, SharedSettings, WorkerSettings, new_id
from router import jobs
from router.dispatcher import Dispatcher
from tests.support.calls import chat
from tests.support.scripted import ScriptedEngine
from worker.service import Worker


@dataclass
class Pair:
    """A started Dispatcher, and what ``serving`` runs a Worker with."""

    dispatcher: Dispatcher
    engine: ScriptedEngine
    worker_settings: WorkerSettings


def _job(dispatcher: Dispatcher, tenant: str = "") -> Job:
    job = jobs.make_job(
        chat(max_tokens=4), router_id=dispatcher.settings.router_id,
        reply_stream=dispatcher.queue.reply_stream, deadline_unix_ms=0, trace={},
    )  # fmt: skip
    job.tenant = tenant
    return job


@pytest.fixture
async def pair(redis_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    shared = SharedSettings(
        redis_url=redis_url, key_prefix=new_id("qs-dispatch"), heartbeat_interval_s=0.2
    ).model_dump()
    settings = RouterSettings(**shared, max_inflight_per_tenant=1)
    dispatcher = Dispatcher(router_queue(settings, settings.router_id), settings)
    worker_settings = WorkerSettings(**shared, status_file=str(tmp_path / "status.json"))
    await dispatcher.start()
    try:
        yield Pair(dispatcher, ScriptedEngine(asyncio.Event()), worker_settings)
    finally:
        await dispatcher.stop()
        await dispatcher.queue.close()


@contextlib.asynccontextmanager
async def serving(pair: Pair) -> AsyncIterator[Worker]:
    """Run a Worker on the pair's engine until the block ends (then drain it)."""
    settings = pair.worker_settings
    queue = worker_queue(settings, settings.worker_id, 200)
    worker = Worker(settings, pair.engine, queue, capacity=4)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: bool(pair.dispatcher.view.workers), "the worker's heartbeat")
        yield worker
    finally:
        worker.drain()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await queue.close()


async def until(ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _events(dispatcher: Dispatcher, job: Job) -> list[pb.ChatEvent]:
    async with asyncio.timeout(30):
        stream = await dispatcher.open(job)
        async with contextlib.aclosing(stream):
            return [event async for event in stream]


async def _kinds(dispatcher: Dispatcher, job: Job) -> list[str | None]:
    return [event.WhichOneof("event") for event in await _events(dispatcher, job)]


async def test_a_request_streams_through_the_queue_and_a_worker(pair: Pair) -> None:
    pair.engine.gate.set()  # type: ignore[union-attr]
    async with serving(pair):
        job = _job(pair.dispatcher)
        pair.dispatcher.admit(job.tenant)
        assert await _kinds(pair.dispatcher, job) == ["started", "delta", "finished", "usage"]
    assert pair.engine.runs == [job.request_id]
    assert pair.dispatcher.inflight == 0


async def test_no_worker_is_refused_as_unavailable(pair: Pair) -> None:
    with pytest.raises(RequestError) as refused:
        pair.dispatcher.admit("")
    assert refused.value.code == UNAVAILABLE and refused.value.retryable
    assert "no worker" in refused.value.message


async def test_a_tenant_at_its_cap_is_refused_with_a_retry_hint(pair: Pair) -> None:
    async with serving(pair):
        first = _job(pair.dispatcher, tenant="alpha")
        held = asyncio.create_task(_kinds(pair.dispatcher, first))
        await until(lambda: bool(pair.engine.runs), "the job to run")  # the slot is held
        with pytest.raises(RequestError) as refused:
            pair.dispatcher.admit("alpha")
        assert refused.value.code == RESOURCE_EXHAUSTED and refused.value.retry_after_ms
        pair.dispatcher.admit("beta")  # another tenant is not held back
        pair.engine.gate.set()  # type: ignore[union-attr]
        assert (await held)[-1] == "usage"
        pair.dispatcher.admit("alpha")  # the slot is free again


async def test_abort_of_a_running_stream_reaches_the_engine(pair: Pair) -> None:
    async with serving(pair):
        job = _job(pair.dispatcher)
        stream = asyncio.create_task(_events(pair.dispatcher, job))
        await until(lambda: bool(pair.engine.runs), "the job to run")
        assert await pair.dispatcher.abort(job.request_id)
        events = await stream
        await until(lambda: job.request_id in pair.engine.aborted, "the engine's abort")
    reasons = [e.finished.reason for e in events if e.HasField("finished")]
    assert reasons == [pb.FINISH_REASON_ABORT], events


async def test_open_queues_the_job_before_anything_is_read(pair: Pair) -> None:
    pair.engine.gate.set()  # type: ignore[union-attr]
    async with serving(pair):
        job = _job(pair.dispatcher)
        stream = await pair.dispatcher.open(job)
        async with contextlib.aclosing(stream):
            await until(lambda: job.request_id in pair.engine.runs, "the job to run unread")
            kinds = [event.WhichOneof("event") async for event in stream]
    assert kinds == ["started", "delta", "finished", "usage"]
    assert pair.dispatcher.inflight == 0


async def test_closing_an_unread_stream_aborts_it_and_frees_its_slot(pair: Pair) -> None:
    async with serving(pair):
        job = _job(pair.dispatcher, tenant="alpha")
        stream = await pair.dispatcher.open(job)
        await until(lambda: job.request_id in pair.engine.runs, "the job to run")
        with pytest.raises(RequestError):
            pair.dispatcher.admit("alpha")  # its slot is held
        await stream.aclose()  # as when the client goes away
        assert pair.dispatcher.inflight == 0
        pair.dispatcher.admit("alpha")
        await until(lambda: job.request_id in pair.engine.aborted, "the engine's abort")


async def test_the_high_slot_is_kept_only_while_high_jobs_come(pair: Pair) -> None:
    """high_priority_reserve (1) holds a slot free only after a HIGH job: before, all four
    slots run NORMAL jobs (a slot kept for nobody would leave a stream waiting a whole
    request at full concurrency); after, three do."""

    async def hold(count: int) -> list[asyncio.Task[list[str | None]]]:
        started = len(pair.engine.runs)
        held = [
            asyncio.create_task(_kinds(pair.dispatcher, _job(pair.dispatcher)))
            for _ in range(count)
        ]
        await until(lambda: len(pair.engine.runs) >= started + count - 1, "the jobs to run")
        await asyncio.sleep(0.5)  # room for one more claim, were a slot free
        return held

    async with serving(pair) as worker:
        assert worker.reserve == 0
        held = await hold(4)
        assert len(pair.engine.runs) == 4  # every slot runs a NORMAL job
        pair.engine.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*held)
        high = _job(pair.dispatcher)
        high.chat.priority = pb.PRIORITY_HIGH
        assert (await _kinds(pair.dispatcher, high))[-1] == "usage"
        assert worker.reserve == 1
        pair.engine.gate.clear()  # type: ignore[union-attr]
        held = await hold(4)
        assert len(pair.engine.runs) == 5 + 3  # one slot stays free for HIGH
        pair.engine.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*held)
        worker._last_high -= worker.settings.high_priority_reserve_hold_s + 1  # type: ignore[operator]
        assert worker.reserve == 0
