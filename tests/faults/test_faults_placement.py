"""Prefix-aware placement on the fault stack (two real workers): a conversation's turns
run on one worker, and a job placed on a worker that cannot take it runs elsewhere."""

from __future__ import annotations

import asyncio
import time

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import decode_lease
from qwen_serve.queue.keys import Keys
from router.jobs import make_job
from router.placement import prefix_key, rank
from tests.fault_support import (
    PREFIX,
    FaultStack,
    Stub,
    await_workers,
    freeze,
    live_worker_ids,
    run_stream,
    thaw,
    worker_id,
)
from tests.helpers import user

pytestmark = pytest.mark.e2e


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


async def test_a_conversation_stays_on_one_worker(faults: FaultStack, fstub: Stub) -> None:
    """Eight conversations of four turns, four side by side: every turn of one
    conversation runs where its first did, and the conversations use both workers."""
    await await_workers(faults, 2)
    holders = []
    for batch in range(2):
        runs = [_conversation(faults, fstub, f"topic {batch}-{i}", 4) for i in range(4)]
        holders += await asyncio.gather(*runs)
    for topic, ran_on in enumerate(holders):
        assert len(set(ran_on)) == 1, (topic, ran_on)
    assert len({ran_on[0] for ran_on in holders}) == 2, holders


def _ranked_first_on(target: str, workers: list[str]) -> str:
    """A conversation topic whose key ranks ``target`` first among ``workers``."""
    for i in range(1000):
        request = _turn(f"placed {i}", 0)
        job = make_job(request, router_id="", reply_stream="", deadline_unix_ms=0, trace={})
        key = prefix_key(job)
        if key and rank(key, workers)[0] == target:
            return f"placed {i}"
    raise AssertionError("no topic ranks the worker first")


async def test_a_job_placed_on_a_frozen_worker_runs_elsewhere(
    faults: FaultStack, fstub: Stub
) -> None:
    """SIGSTOP a worker while its heartbeat is still fresh and send a chat placed on it:
    after placement_wait_s the router moves it to the shared stream and the other worker
    runs it, once."""
    await await_workers(faults, 2)
    ids = sorted(await live_worker_ids(faults))
    victim = next(w for w in faults.workers if worker_id(w) == ids[0])
    topic = _ranked_first_on(ids[0], ids)
    freeze(victim)
    try:
        began = time.monotonic()
        stream = await run_stream(fstub, _turn(topic, 0), timeout=120)
        waited = time.monotonic() - began
    finally:
        thaw(victim)
    assert stream.complete and stream.started == 1, stream
    assert await _holder(faults, stream.request_id) == ids[1], waited
    await await_workers(faults, 2)
