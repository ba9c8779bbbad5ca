"""Prefix-aware placement on the fault stack (two real workers): a conversation's turns
run on one worker, and a job placed on a worker that cannot take it runs elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.codec import decode_lease
from qwen_serve.queue.keys import Keys
from qwen_serve_dev import devstack
from router.jobs import make_job
from router.placement import prefix_key, rank
from tests.fault_support import (
    PREFIX,
    STACK_FLAGS,
    FaultStack,
    Stub,
    await_workers,
    freeze,
    live_worker_ids,
    run_stream,
    thaw,
    worker_id,
)
from tests.support.calls import user

pytestmark = pytest.mark.e2e


@pytest.fixture
async def pstub(faults: FaultStack) -> AsyncIterator[Stub]:
    """A stub on a router of the fault stack with placement on (as by default; the flag
    keeps these tests about placement should the default change)."""
    port = devstack.free_port()
    flags = (*STACK_FLAGS, "--placement")
    proc = devstack.start_router(
        faults.redis_url, port, faults.log_dir, *flags, name="router-placing"
    )
    target = f"127.0.0.1:{port}"
    try:
        devstack.wait_serving(target, [proc], timeout=60)
        await asyncio.sleep(2.5)  # its view has seen every worker's heartbeat
        async with grpc.aio.insecure_channel(target) as channel:
            yield serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        proc.stop()


def _turn(topic: str, turn: int) -> pb.ChatRequest:
    """Turn ``turn`` of a conversation: its whole history, then a new question."""
    request = pb.ChatRequest(
        enable_thinking=False,
        sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
    )
    request.messages.add(role=pb.ROLE_SYSTEM).content.add(text="Answer briefly.")
    for earlier in range(turn + 1):
        request.messages.append(user(f"{topic}: question {earlier}"))
        if earlier < turn:
            request.messages.add(role=pb.ROLE_ASSISTANT).content.add(text=f"answer {earlier}")
    return request


async def _holder(stack: FaultStack, request_id: str) -> str:
    queue = stack.queue()
    try:
        raw = await queue.redis.get(Keys(PREFIX).lease(request_id, 0))
    finally:
        await queue.close()
    return decode_lease(raw).worker_id if raw else ""


async def _conversation(stack: FaultStack, stub: Stub, topic: str, turns: int) -> list[str]:
    """Run the turns one after another; the worker that ran each."""
    holders = []
    for turn in range(turns):
        stream = await run_stream(stub, _turn(topic, turn))
        assert stream.complete, stream
        holders.append(await _holder(stack, stream.request_id))
    return holders


async def test_a_conversation_stays_on_its_worker(faults: FaultStack, pstub: Stub) -> None:
    """Conversations of four turns, one at a time on an idle fleet: every turn runs on
    the worker its conversation ranks first, and each worker is some conversation's."""
    await await_workers(faults, 2)
    await _idle(faults)
    ids = sorted(await live_worker_ids(faults))
    topics = [_ranked_first_on(ids[i % 2], ids, skip=i // 2) for i in range(6)]
    for i, topic in enumerate(topics):
        ran_on = await _conversation(faults, pstub, topic, 4)
        assert ran_on == [ids[i % 2]] * 4, (topic, ran_on)


async def _idle(stack: FaultStack, timeout: float = 60) -> None:
    """Wait until the live workers are the stack's own (an earlier test's ghost consumer
    has expired) and their heartbeats show nothing running (the warm-up ended)."""
    ours = {worker_id(w) for w in stack.workers}
    deadline = time.monotonic() + timeout
    while True:
        queue = stack.queue()
        try:
            statuses = await queue.live_workers()
        finally:
            await queue.close()
        live = {s.worker_id for s in statuses}
        if live == ours and not any(s.running for s in statuses):
            await asyncio.sleep(2.5)  # the router's view (read once a second) catches up
            return
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.5)


def _ranked_first_on(target: str, workers: list[str], skip: int = 0) -> str:
    """A conversation topic whose key ranks ``target`` first among ``workers`` (the
    ``skip``-th such topic)."""
    for i in range(1000):
        request = _turn(f"placed {i}", 0)
        job = make_job(request, router_id="", reply_stream="", deadline_unix_ms=0, trace={})
        key = prefix_key(job)
        if key and rank(key, workers)[0] == target:
            if not skip:
                return f"placed {i}"
            skip -= 1
    raise AssertionError("no topic ranks the worker first")


async def test_a_job_placed_on_a_frozen_worker_runs_elsewhere(
    faults: FaultStack, pstub: Stub
) -> None:
    """SIGSTOP a worker while its heartbeat is still fresh and send a chat placed on it:
    after placement_wait_s the router moves it to the shared stream and the other worker
    runs it, once."""
    await await_workers(faults, 2)
    await _idle(faults)
    ids = sorted(await live_worker_ids(faults))
    victim = next(w for w in faults.workers if worker_id(w) == ids[0])
    topic = _ranked_first_on(ids[0], ids)
    freeze(victim)
    try:
        began = time.monotonic()
        stream = await run_stream(pstub, _turn(topic, 0), timeout=120)
        waited = time.monotonic() - began
    finally:
        thaw(victim)
    assert stream.complete and stream.started == 1, stream
    assert await _holder(faults, stream.request_id) == ids[1], waited
    await await_workers(faults, 2)
