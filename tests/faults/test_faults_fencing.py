"""Stalls and freezes of workers (SIGSTOP/SIGCONT): no job left behind, no stream doubled.

- A worker frozen beyond the heartbeat TTL loses its streams to another worker;
  when it resumes, the router drops what it still writes (fencing) and it aborts
  its engine requests. An Abort in that failover window ends the stream at once.
- Jobs Redis delivered while the workers were stalled (the claim's answer timed
  out) are found in the workers' pending lists and started.
- A job a live worker claimed but never started is taken back after
  ``reclaim_unstarted_s``, whatever that worker's heartbeat says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import WorkerQueue
from qwen_serve.queue.codec import WorkerStatus
from qwen_serve.queue.keys import WORKER_GROUP, Keys
from tests.fault_support import (
    HEARTBEAT_TTL_S,
    PREFIX,
    FaultStack,
    Stream,
    Stub,
    assert_exact,
    await_workers,
    freeze,
    lease_holders,
    live_worker_ids,
    outcome,
    replies_until_terminal,
    run_stream,
    start_streams,
    submit_as_router,
    submit_claimed_by_ghost,
    thaw,
    worker_id,
)
from tests.reliability import Outcome, Scenario, record
from tests.support.calls import chat, wait_engines_idle

pytestmark = pytest.mark.e2e

RECLAIM_UNSTARTED_S = 15.0  # the default reclaim_unstarted_s


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(str(tiny_model))


async def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def _busiest_holder(stack: FaultStack, outs: list[Stream]) -> tuple[str, list[Stream]]:
    """The worker running the most of these streams (the leases say who runs what).

    Streams that already ended do not count: a worker that came up later may give its
    first tokens only after the other has finished some streams.
    """
    running = [s for s in outs if not s.ended_at]
    holders = await lease_holders(stack, [s.request_id for s in running])
    assert all(holders), f"streams moved off their worker before the freeze: {holders}"
    busiest = max(set(holders), key=holders.count)
    on_it = [s for s, h in zip(running, holders, strict=True) if h == busiest]
    on_it.sort(key=lambda s: len(s.token_ids))  # the least advanced first
    assert len(on_it) >= 2, f"no worker runs two streams: {holders}"
    return busiest, on_it


async def test_frozen_worker_is_fenced_and_an_abort_in_the_failover_ends_at_once(
    faults: FaultStack, fstub: Stub, tokenizer: object
) -> None:
    """SIGSTOP the busiest worker beyond the heartbeat TTL: its streams continue on the
    other worker; Abort of one of them in that window ends it with Finished (abort);
    after SIGCONT the router drops the old worker's writes and it aborts its requests."""
    await await_workers(faults, 2)
    tokens = 3000  # still running when the TTL has passed, despite a slow first token
    tasks, outs = await start_streams(fstub, 6, tokens)
    victim_id, on_victim = await _busiest_holder(faults, outs)
    victim = next(w for w in faults.workers if worker_id(w) == victim_id)
    freeze(victim)
    frozen_at = time.monotonic()
    try:
        target, moved = on_victim[0], on_victim[1:]
        await _wait_for(
            lambda: _gone(faults, victim_id), 60, "the frozen worker's heartbeat to expire"
        )
        aborted_at = time.monotonic()
        found = (await fstub.Abort(pb.AbortRequest(request_id=target.request_id))).found
        assert found, f"the stream ended before the Abort: {target}"
        await _wait_for(lambda: _ended(target), 60, "the aborted stream to end")
        abort_s = target.ended_at - aborted_at
        counts = {id(s): len(s.token_ids) for s in moved}
        await _wait_for(
            lambda: _progressed(moved, counts, 16), 120, "the streams to continue elsewhere"
        )
    finally:
        thaw(victim)
    streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 300))
    assert target.aborted, target
    rest = [s for s in streams if s is not target]
    assert_exact(rest, tokens, tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
    await _wait_for(lambda: _logged(victim, "lost attempt"), 60, "the resumed worker to fence")
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=60) == 0
    result = outcome(rest, expected_tokens=tokens)
    result.recovery_s = time.monotonic() - frozen_at
    result.note = (
        f"{len(moved)} of the frozen worker's streams continued on the other worker; "
        "after SIGCONT it logged the lost attempts and aborted them"
    )
    record(Scenario.WORKER_FREEZE, result)
    record(
        Scenario.ABORT_FAILOVER,
        Outcome(1, 0, 1, 0, 0, recovery_s=abort_s, note="recovery: Abort to the stream's end"),
    )


async def _gone(stack: FaultStack, wid: str) -> bool:
    return wid not in await live_worker_ids(stack)


async def _ended(stream: Stream) -> bool:
    return stream.ended_at > 0


async def _progressed(streams: list[Stream], before: dict[int, int], more: int) -> bool:
    return all(len(s.token_ids) >= before[id(s)] + more or s.ended_at for s in streams)


async def _logged(proc: object, text: str) -> bool:
    return text in proc.log_path.read_text()  # type: ignore[attr-defined]


async def _pending_on(stack: FaultStack, consumers: set[str]) -> int:
    """Entries pending on these consumers, over the shared job streams and their own."""
    keys = Keys(PREFIX)
    streams = [*keys.job_streams, *(keys.worker_jobs(c) for c in consumers)]
    queue = stack.queue()
    try:
        summaries = [await queue.redis.xpending(s, WORKER_GROUP) for s in streams]
    finally:
        await queue.close()
    return sum(
        int(c["pending"])
        for summary in summaries
        for c in summary.get("consumers") or []
        if (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]) in consumers
    )


async def test_jobs_delivered_to_stalled_workers_are_started(
    faults: FaultStack, fstub: Stub
) -> None:
    """SIGSTOP both workers while their XREADGROUP is blocked, queue jobs (Redis delivers
    them into the stopped workers' pending lists), SIGCONT after the claims' socket
    timeout: the workers find the jobs in their pending lists and run them."""
    await await_workers(faults, 2)
    ids = {worker_id(w) for w in faults.workers}
    marker = "delivered here but not started"
    before = sum(w.log_path.read_text().count(marker) for w in faults.workers)
    streams: list[Stream] = []
    delivered = 0
    for _ in range(8):
        for proc in faults.workers:
            freeze(proc)
        try:
            tasks = [asyncio.create_task(run_stream(fstub, chat(max_tokens=8))) for _ in range(4)]
            await asyncio.sleep(1.0)
            delivered = await _pending_on(faults, ids)
            await asyncio.sleep(3.5)  # past the claim's socket timeout (2 s + its block)
        finally:
            for proc in faults.workers:
                thaw(proc)
        streams += await asyncio.wait_for(asyncio.gather(*tasks), 180)
        recovered = sum(w.log_path.read_text().count(marker) for w in faults.workers) - before
        if delivered and recovered:
            break
    assert delivered and recovered, "no claim answer was lost in 8 tries"
    assert all(s.complete and len(s.token_ids) == 8 for s in streams), streams
    result = outcome(streams, expected_tokens=8)
    result.note = f"{recovered} entries found in the pending lists after the stall and started"
    record(Scenario.LOST_CLAIM, result)


async def test_job_claimed_by_a_live_worker_that_never_starts_it_is_taken_back(
    faults: FaultStack,
) -> None:
    """A consumer with a fresh heartbeat claims a job and never starts it: another worker
    takes it over once it has been untouched for reclaim_unstarted_s."""
    queue, job = await submit_as_router(faults, "test-router-stalled")
    ghost = WorkerQueue(queue.redis, Keys(PREFIX), "ghost-live", HEARTBEAT_TTL_S)
    status = WorkerStatus(worker_id="ghost-live", capacity=1)

    async def heartbeat() -> None:
        while True:
            await ghost.heartbeat(status)
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeat())
    try:
        await ghost.heartbeat(status)
        await submit_claimed_by_ghost(queue, job, consumer="ghost-live")
        claimed = time.monotonic()
        events = await replies_until_terminal(queue, timeout=RECLAIM_UNSTARTED_S + 120)
        taken_after = time.monotonic() - claimed
        assert "ghost-live" in await live_worker_ids(faults)  # alive all along
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await ghost.leave()
        await queue.close()
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "usage", kinds
    assert sum(len(e.delta.token_ids) for e in events if e.HasField("delta")) == 6
    assert taken_after >= RECLAIM_UNSTARTED_S  # taken back by the stall bound, not as dead
    record(
        Scenario.STALLED_UNSTARTED,
        Outcome(1, 1, 0, 0, 0, recovery_s=taken_after, note="recovery: claim to the stream's end"),
    )
