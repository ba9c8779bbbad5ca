"""Fault injection with real processes: every request ends complete or with a clear status.

The fault stack (tests/fault_support.py: redis-server, two workers with the
CPU engine, a router) is shared with the other fault modules because these
tests kill things. Each scenario records a row of docs/reliability.md
(written when QS_RELIABILITY_REPORT names a file; see tests/reliability.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.codec import Job
from qwen_serve.queue.keys import Keys
from qwen_serve_dev import devstack
from tests.fault_support import (
    PREFIX,
    STACK_FLAGS,
    FaultStack,
    Stub,
    assert_exact,
    await_workers,
    busiest_worker,
    long_chat,
    outcome,
    replies_until_terminal,
    run_stream,
    start_router,
    start_streams,
    start_worker,
    submit_as_router,
    submit_claimed_by_ghost,
)
from tests.reliability import Outcome, Scenario, record
from tests.support.calls import chat, wait_engines_idle

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(str(tiny_model))


# ------------------------------------------------------------------ queue-level recovery


async def test_unstarted_job_of_a_dead_worker_is_taken_over(faults: FaultStack) -> None:
    queue, job = await submit_as_router(faults, "test-router-reclaim")
    try:
        await submit_claimed_by_ghost(queue, job)
        start = time.monotonic()
        events = await replies_until_terminal(queue)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "started" and kinds[-1] == "usage", kinds
        assert sum(len(e.delta.token_ids) for e in events if e.HasField("delta")) == 6
        record(
            Scenario.RECLAIM,
            Outcome(1, 1, 0, 0, 0, recovery_s=time.monotonic() - start),
        )
    finally:
        await queue.close()


async def test_job_delivered_too_often_is_dead_lettered(faults: FaultStack) -> None:
    queue, job = await submit_as_router(faults, "test-router-dlq")
    try:
        await submit_claimed_by_ghost(queue, job, retrycount=5)
        events = await replies_until_terminal(queue)
        assert events[-1].HasField("error")
        assert events[-1].error.code == grpc.StatusCode.ABORTED.value[0]
        assert not events[-1].error.retryable
        dead = await queue.redis.xrange(Keys(PREFIX).dead_letters)
        assert any(Job.FromString(fields[b"m"]).request_id == job.request_id for _, fields in dead)
        record(Scenario.DEAD_LETTER, Outcome(1, 0, 1, 0, 0))
    finally:
        await queue.close()


# ------------------------------------------------------------------ process-level faults


async def test_cancellation_burst(faults: FaultStack, fstub: Stub) -> None:
    calls = [fstub.Chat(long_chat(i, 400), timeout=120) for i in range(1000)]
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
    after = await run_stream(fstub, chat(max_tokens=4))
    assert after.complete
    record(
        Scenario.CANCEL_BURST,
        Outcome(1000, 0, 1000, 0, 0, recovery_s=time.monotonic() - start),
    )


async def test_ten_times_overload(faults: FaultStack) -> None:
    port = devstack.free_port()
    small = devstack.start_router(
        faults.redis_url,
        port,
        faults.log_dir,
        *STACK_FLAGS,
        "--max-inflight",
        "8",
        name="router-overload",
    )
    try:
        devstack.wait_serving(f"127.0.0.1:{port}", [small], timeout=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serve_pb2_grpc.InferenceStub(channel)
            streams = await asyncio.gather(*(run_stream(stub, long_chat(i, 16)) for i in range(80)))
    finally:
        small.stop()
    statuses = {s.status for s in streams if not s.complete}
    assert statuses <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, statuses
    assert any(s.complete for s in streams)
    assert all(len(s.token_ids) == 16 for s in streams if s.complete)
    result = outcome(list(streams), expected_tokens=16)
    assert result.lost == 0 and result.duplicates == 0
    record(Scenario.OVERLOAD, result)


async def test_router_kill_aborts_its_requests_and_a_new_router_serves(
    faults: FaultStack, fstub: Stub
) -> None:
    progress = asyncio.Event()
    tasks = [asyncio.create_task(run_stream(fstub, long_chat(i, 2000), progress)) for i in range(4)]
    await asyncio.wait_for(progress.wait(), 120)
    faults.router.kill()
    streams = await asyncio.gather(*tasks)
    assert all(s.status == grpc.StatusCode.UNAVAILABLE for s in streams)
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=60) == 0
    start = time.monotonic()
    faults.router = start_router(faults.log_dir, faults.redis_url, faults.router_port, "router-2")
    devstack.wait_serving(faults.target, [faults.router], timeout=60)
    async with grpc.aio.insecure_channel(faults.target) as channel:
        after = await run_stream(serve_pb2_grpc.InferenceStub(channel), chat(max_tokens=4))
    assert after.complete
    result = outcome(list(streams))
    result.recovery_s = time.monotonic() - start
    record(Scenario.ROUTER_KILL, result)


async def test_worker_sigkill_mid_stream_is_continued(
    faults: FaultStack, fstub: Stub, tokenizer: object
) -> None:
    """Raw generations (no parser), so the text must be exactly the tokens' decoding."""
    await await_workers(faults, 2)
    tokens = 160
    tasks, outs = await start_streams(fstub, 6, tokens)
    victim = await busiest_worker(faults, outs)
    faults.workers.remove(victim)
    victim.kill()
    start = time.monotonic()
    try:
        streams = await asyncio.gather(*tasks)
    finally:
        faults.workers.append(start_worker(faults.log_dir, faults.redis_url, "worker-replacement"))
    assert_exact(list(streams), tokens, tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
    result = outcome(list(streams), expected_tokens=tokens)
    result.recovery_s = time.monotonic() - start
    record(Scenario.WORKER_KILL, result)


async def test_worker_drain_hands_unfinished_streams_over(
    faults: FaultStack, fstub: Stub, tokenizer: object
) -> None:
    """SIGTERM with a 3 s drain grace (the fault stack's workers): what is not done by
    then is handed over and continued on the other worker, token-exact."""
    await await_workers(faults, 2)
    tokens = 1500  # still streaming when the 3 s grace ends
    tasks, outs = await start_streams(fstub, 4, tokens)
    draining = await busiest_worker(faults, outs)
    faults.workers.remove(draining)
    draining.popen.terminate()
    try:
        streams = await asyncio.gather(*tasks)
        assert draining.popen.wait(120) == 0
    finally:
        faults.workers.append(start_worker(faults.log_dir, faults.redis_url, "worker-after-drain"))
    assert "handing" in draining.log_path.read_text()  # the grace ran out mid-stream
    assert_exact(list(streams), tokens, tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
    record(Scenario.DRAIN, outcome(list(streams), expected_tokens=tokens))
