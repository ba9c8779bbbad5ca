"""Fault injection with real processes: every request ends complete or with a clear status.

A stack of its own (redis-server, two workers with the CPU engine, a router)
because these tests kill things. Each scenario records a row of
docs/reliability.md (written when QS_RELIABILITY_REPORT names a file; see
tests/reliability.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from qwen_serve import devstack
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import RouterQueue, connect
from qwen_serve.queue.codec import Job, Reply, encode
from qwen_serve.queue.keys import WORKER_GROUP, Keys
from qwen_serve.settings import QueueSettings
from router.jobs import make_job
from tests.helpers import chat, wait_engines_idle
from tests.reliability import Outcome, Scenario, record, write_report

pytestmark = pytest.mark.e2e

PREFIX = "qs-faults"
Stub = serve_pb2_grpc.InferenceStub


@dataclass
class FaultStack:
    """Processes of the fault stack, restartable by the tests."""

    log_dir: Path
    redis_port: int
    redis: devstack.Proc
    workers: list[devstack.Proc]
    router: devstack.Proc
    router_port: int
    extra: list[devstack.Proc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def all(self) -> list[devstack.Proc]:
        return [self.router, *self.workers, *self.extra, self.redis]


def _worker(log_dir: Path, redis_url: str, name: str) -> devstack.Proc:
    return devstack.start_worker(redis_url, log_dir, "--key-prefix", PREFIX, name=name)


def _router(log_dir: Path, redis_url: str, port: int, name: str) -> devstack.Proc:
    flags = ("--key-prefix", PREFIX, "--max-inflight-per-tenant", "1024")
    return devstack.start_router(redis_url, port, log_dir, *flags, name=name)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FaultStack]:
    log_dir = tmp_path_factory.mktemp("faults")
    port = devstack.free_port()
    redis, url = devstack.start_redis(log_dir, port)
    workers = [_worker(log_dir, url, f"worker-{i}") for i in range(2)]
    router_port = devstack.free_port()
    stack = FaultStack(
        log_dir, port, redis, workers, _router(log_dir, url, router_port, "router"), router_port
    )
    try:
        devstack.wait_serving(stack.target, stack.all())
        _wait_workers(stack, 2)
        yield stack
    finally:
        for proc in stack.all():
            proc.stop(timeout=20)


async def _live_workers(stack: FaultStack) -> int:
    queue = RouterQueue(connect(_settings(stack)), Keys(PREFIX), "probe", 5.0)
    try:
        return len(await queue.live_workers())
    finally:
        await queue.close()


def _wait_workers(stack: FaultStack, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while asyncio.run(_live_workers(stack)) < count:
        assert time.monotonic() < deadline, "workers did not come up"
        time.sleep(1)


async def _busiest_worker(stack: FaultStack, timeout: float = 20) -> devstack.Proc:
    """The worker process running the most requests, once the heartbeats show any."""
    ids = {}
    for proc in stack.workers:
        found = re.search(r"starting worker (\S+)", proc.log_path.read_text())
        assert found, proc.tail()
        ids[found.group(1)] = proc
    deadline = time.monotonic() + timeout
    queue = RouterQueue(connect(_settings(stack)), Keys(PREFIX), "probe", 5.0)
    try:
        while True:
            running = {w.worker_id: w.running for w in await queue.live_workers()}
            busiest = max(ids, key=lambda wid: running.get(wid, 0))
            if running.get(busiest, 0) > 0:
                return ids[busiest]
            assert time.monotonic() < deadline, running
            await asyncio.sleep(0.2)
    finally:
        await queue.close()


async def _await_workers(stack: FaultStack, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while await _live_workers(stack) < count:
        assert time.monotonic() < deadline, "workers did not come up"
        await asyncio.sleep(1)


def _settings(stack: FaultStack) -> QueueSettings:
    return QueueSettings(redis_url=stack.redis_url, key_prefix=PREFIX)


@pytest.fixture
async def fstub(faults: FaultStack) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(faults.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(str(tiny_model))


# ------------------------------------------------------------------ helpers


@dataclass
class Stream:
    """What one client saw."""

    token_ids: list[int] = field(default_factory=list)
    content: str = ""
    started: int = 0
    finished: list[pb.Finished] = field(default_factory=list)
    usage: pb.Usage | None = None
    error: pb.Error | None = None
    status: grpc.StatusCode | None = None

    @property
    def complete(self) -> bool:
        return self.usage is not None and self.error is None and self.status is None

    @property
    def clear_failure(self) -> bool:
        retryable = self.error is not None and self.error.retryable
        return retryable or self.status in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


async def _run(
    stub: Stub,
    request: pb.ChatRequest | pb.GenerateRequest,
    progress: asyncio.Event | None = None,
    timeout: float = 180,
) -> Stream:
    out = Stream()
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    try:
        async for event in call(request, timeout=timeout):  # type: ignore[operator]
            kind = event.WhichOneof("event")
            if kind == "started":
                out.started += 1
            elif kind == "delta":
                out.token_ids.extend(event.delta.token_ids)
                out.content += event.delta.content
                if progress is not None and len(out.token_ids) >= 8:
                    progress.set()
            elif kind == "finished":
                out.finished.append(event.finished)
            elif kind == "usage":
                out.usage = event.usage
            elif kind == "error":
                out.error = event.error
    except grpc.aio.AioRpcError as exc:
        out.status = exc.code()
    return out


def _long_chat(i: int, tokens: int = 120) -> pb.ChatRequest:
    return chat(f"Request {i}: describe the system.", max_tokens=tokens, ignore_eos=True)


def _outcome(streams: list[Stream], expected_tokens: int | None = None) -> Outcome:
    duplicates = sum(
        1
        for s in streams
        if s.started > 1 or (expected_tokens and s.complete and len(s.token_ids) > expected_tokens)
    )
    missing = sum(
        1 for s in streams if expected_tokens and s.complete and len(s.token_ids) < expected_tokens
    )
    return Outcome(
        sent=len(streams),
        completed=sum(s.complete for s in streams),
        failed_clear=sum((not s.complete) and s.clear_failure for s in streams),
        lost=sum((not s.complete) and not s.clear_failure for s in streams) + missing,
        duplicates=duplicates,
    )


# ------------------------------------------------------------------ queue-level recovery


async def _submit_claimed_by_ghost(queue: RouterQueue, job: Job, retrycount: int = 0) -> None:
    """Queue ``job`` and, atomically, claim it as a consumer that never heartbeats.

    That is the state a SIGKILLed worker leaves: the job pending on a dead consumer.
    """
    keys = Keys(PREFIX)
    async with queue.redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.jobs, encode(job))  # type: ignore[arg-type]
        pipe.xreadgroup(WORKER_GROUP, "ghost-worker", {keys.jobs: ">"}, count=1)
        _, claimed = await pipe.execute()
    entry_id = claimed[0][1][0][0]
    if retrycount:
        await queue.redis.xclaim(
            keys.jobs, WORKER_GROUP, "ghost-worker", 0, [entry_id], retrycount=retrycount
        )


async def _submit_as_router(stack: FaultStack, router_id: str) -> tuple[RouterQueue, Job]:
    queue = RouterQueue(connect(_settings(stack), block_ms=1000), Keys(PREFIX), router_id, 5.0)
    await queue.heartbeat()
    job = make_job(
        chat("Reclaim me", max_tokens=6, ignore_eos=True),
        router_id=router_id,
        reply_stream=queue.reply_stream,
        deadline_unix_ms=0,
        trace={},
    )
    return queue, job


async def _replies_until_terminal(queue: RouterQueue, timeout: float = 60) -> list[pb.ChatEvent]:
    events: list[pb.ChatEvent] = []
    last, deadline = b"0-0", time.monotonic() + timeout
    while time.monotonic() < deadline:
        await queue.heartbeat()
        for entry_id, reply in await queue.read_replies(last, block_ms=500):
            last = entry_id
            assert isinstance(reply, Reply)
            events.extend(reply.events)
        if events and events[-1].WhichOneof("event") in ("usage", "error"):
            return events
    raise AssertionError(f"no terminal event; got {events}")


async def test_unstarted_job_of_a_dead_worker_is_taken_over(faults: FaultStack) -> None:
    queue, job = await _submit_as_router(faults, "test-router-reclaim")
    try:
        await _submit_claimed_by_ghost(queue, job)
        start = time.monotonic()
        events = await _replies_until_terminal(queue)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "usage", kinds
        assert sum(len(e.delta.token_ids) for e in events if e.HasField("delta")) == 6
        record(
            Scenario.RECLAIM,
            Outcome(
                sent=1,
                completed=1,
                failed_clear=0,
                lost=0,
                duplicates=0,
                recovery_s=time.monotonic() - start,
            ),
        )
    finally:
        await queue.close()


async def test_job_delivered_too_often_is_dead_lettered(faults: FaultStack) -> None:
    queue, job = await _submit_as_router(faults, "test-router-dlq")
    try:
        await _submit_claimed_by_ghost(queue, job, retrycount=5)
        events = await _replies_until_terminal(queue)
        assert events[-1].HasField("error")
        assert events[-1].error.code == grpc.StatusCode.ABORTED.value[0]
        assert not events[-1].error.retryable
        dead = await queue.redis.xrange(Keys(PREFIX).dead_letters)
        assert any(Job.FromString(fields[b"m"]).request_id == job.request_id for _, fields in dead)
        record(
            Scenario.DEAD_LETTER, Outcome(sent=1, completed=0, failed_clear=1, lost=0, duplicates=0)
        )
    finally:
        await queue.close()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    write_report()


# ------------------------------------------------------------------ process-level faults


async def test_cancellation_burst(faults: FaultStack, fstub: Stub) -> None:
    calls = [fstub.Chat(_long_chat(i, 400), timeout=120) for i in range(1000)]
    await asyncio.sleep(0.5)
    for call in calls:
        call.cancel()
    codes = []
    for call in calls:
        try:
            async for _ in call:
                pass
            codes.append(grpc.StatusCode.OK)
        except asyncio.CancelledError:
            codes.append(grpc.StatusCode.CANCELLED)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    assert all(c == grpc.StatusCode.CANCELLED for c in codes), set(codes)
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=60) == 0
    start = time.monotonic()
    after = await _run(fstub, chat(max_tokens=4))
    assert after.complete
    record(
        Scenario.CANCEL_BURST,
        Outcome(
            sent=1000,
            completed=0,
            failed_clear=1000,
            lost=0,
            duplicates=0,
            recovery_s=time.monotonic() - start,
        ),
    )


async def test_ten_times_overload(faults: FaultStack) -> None:
    port = devstack.free_port()
    small = devstack.start_router(
        faults.redis_url,
        port,
        faults.log_dir,
        "--key-prefix",
        PREFIX,
        "--max-inflight",
        "8",
        name="router-overload",
    )
    try:
        devstack.wait_serving(f"127.0.0.1:{port}", [small], timeout=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serve_pb2_grpc.InferenceStub(channel)
            streams = await asyncio.gather(*(_run(stub, _long_chat(i, 16)) for i in range(80)))
    finally:
        small.stop()
    statuses = {s.status for s in streams if not s.complete}
    assert statuses <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, statuses
    assert any(s.complete for s in streams)
    assert all(len(s.token_ids) == 16 for s in streams if s.complete)
    outcome = _outcome(list(streams), expected_tokens=16)
    assert outcome.lost == 0 and outcome.duplicates == 0
    record(Scenario.OVERLOAD, outcome)


async def test_router_kill_aborts_its_requests_and_a_new_router_serves(
    faults: FaultStack, fstub: Stub
) -> None:
    progress = asyncio.Event()
    tasks = [asyncio.create_task(_run(fstub, _long_chat(i, 2000), progress)) for i in range(4)]
    await asyncio.wait_for(progress.wait(), 120)
    faults.router.kill()
    streams = await asyncio.gather(*tasks)
    assert all(s.status == grpc.StatusCode.UNAVAILABLE for s in streams)
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=30) == 0
    start = time.monotonic()
    faults.router = _router(faults.log_dir, faults.redis_url, faults.router_port, "router-2")
    devstack.wait_serving(faults.target, [faults.router], timeout=60)
    async with grpc.aio.insecure_channel(faults.target) as channel:
        after = await _run(serve_pb2_grpc.InferenceStub(channel), chat(max_tokens=4))
    assert after.complete
    outcome = _outcome(list(streams))
    outcome.recovery_s = time.monotonic() - start
    record(Scenario.ROUTER_KILL, outcome)


async def test_redis_restart(faults: FaultStack) -> None:
    async with grpc.aio.insecure_channel(faults.target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        progress = asyncio.Event()
        tasks = [asyncio.create_task(_run(stub, _long_chat(i, 2000), progress)) for i in range(4)]
        await asyncio.wait_for(progress.wait(), 120)
        faults.redis.kill()
        streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 30))
        during = await _run(stub, chat(max_tokens=4), timeout=10)
        assert during.status == grpc.StatusCode.UNAVAILABLE
        streams.append(during)
        assert all(s.clear_failure and not s.complete for s in streams)
        start = time.monotonic()
        faults.redis, _ = devstack.start_redis(faults.log_dir, faults.redis_port)
        devstack.wait_serving(faults.target, [faults.router], timeout=60)
        after = await _run(stub, chat(max_tokens=4))
        assert after.complete
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=30) == 0
    outcome = _outcome(streams)
    outcome.recovery_s = time.monotonic() - start
    record(Scenario.REDIS_RESTART, outcome)


async def test_worker_sigkill_mid_stream_is_continued(
    faults: FaultStack, fstub: Stub, tokenizer: object
) -> None:
    """Raw generations (no parser), so the text must be exactly the tokens' decoding."""
    await _await_workers(faults, 2)
    tokens = 160
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[100 + i, 200, 300, 400]),
            sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        )
        for i in range(6)
    ]
    progress = asyncio.Event()
    tasks = [asyncio.create_task(_run(fstub, r, progress)) for r in requests]
    await asyncio.wait_for(progress.wait(), 120)
    victim = await _busiest_worker(faults)
    faults.workers.remove(victim)
    victim.kill()
    start = time.monotonic()
    try:
        streams = await asyncio.gather(*tasks)
    finally:
        faults.workers.append(_worker(faults.log_dir, faults.redis_url, "worker-replacement"))
    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
    for stream in streams:
        assert stream.complete, (stream.status, stream.error)
        assert stream.started == 1
        assert len(stream.token_ids) == tokens
        expected = backend.decode(stream.token_ids, skip_special_tokens=True)
        # vLLM holds back a trailing incomplete UTF-8 sequence at the very end of a stream.
        assert stream.content == expected.rstrip("\ufffd")
    outcome = _outcome(list(streams), expected_tokens=tokens)
    outcome.recovery_s = time.monotonic() - start
    record(Scenario.WORKER_KILL, outcome)


async def test_worker_drain_finishes_streams(faults: FaultStack, fstub: Stub) -> None:
    await _await_workers(faults, 2)
    progress = asyncio.Event()
    tasks = [asyncio.create_task(_run(fstub, _long_chat(i, 60), progress)) for i in range(4)]
    await asyncio.wait_for(progress.wait(), 120)
    draining = faults.workers.pop(0)
    draining.popen.terminate()
    streams = await asyncio.gather(*tasks)
    assert draining.popen.wait(60) == 0
    assert all(s.complete and len(s.token_ids) == 60 for s in streams)
    record(Scenario.DRAIN, _outcome(list(streams), expected_tokens=60))
