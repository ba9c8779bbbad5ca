"""Delta coalescing, and the worker's reply writer and leases on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import merge_into
from qwen_serve.queue.broker import (
    AttemptRef,
    RouterQueue,
    WorkerQueue,
    router_queue,
    worker_queue,
)
from qwen_serve.queue.codec import Reply, encode
from qwen_serve.settings import SharedSettings, new_id
from router import jobs
from tests.support.calls import chat
from worker.replies import ReplyWriter


def _delta(
    index: int, content: str = "", reasoning: str = "", ids: tuple[int, ...] = ()
) -> pb.ChatEvent:
    return pb.ChatEvent(
        delta=pb.Delta(index=index, content=content, reasoning=reasoning, token_ids=list(ids))
    )


def test_consecutive_deltas_of_one_choice_merge() -> None:
    last = _delta(0, "Hel", ids=(1,))
    assert merge_into(last, _delta(0, "lo", "hm", ids=(2, 3)))
    assert last.delta.content == "Hello" and last.delta.reasoning == "hm"
    assert list(last.delta.token_ids) == [1, 2, 3]


def test_other_choices_and_kinds_do_not_merge() -> None:
    last = _delta(0, "a")
    assert not merge_into(last, _delta(1, "b"))
    assert not merge_into(last, pb.ChatEvent(finished=pb.Finished(index=0)))
    assert last.delta.content == "a"


async def test_event_queue_merges_waiting_deltas_and_keeps_order() -> None:
    from qwen_serve.deltas import EventQueue

    queue = EventQueue()
    queue.put(pb.ChatEvent(started=pb.Started(request_id="r")))
    queue.put(_delta(0, "a", ids=(1,)))
    queue.put(_delta(0, "b", ids=(2,)))
    queue.put(_delta(1, "x", ids=(9,)))
    queue.put(pb.ChatEvent(finished=pb.Finished(index=0)))
    kinds = []
    while len(queue):
        event = await queue.get()
        kinds.append(event.WhichOneof("event"))
        if event.HasField("delta") and event.delta.index == 0:
            assert event.delta.content == "ab" and list(event.delta.token_ids) == [1, 2]
    assert kinds == ["started", "delta", "delta", "finished"]


# ---------------------------------------------------------------- the writer on a real Redis


@pytest.fixture
async def queues(redis_url: str) -> AsyncIterator[tuple[WorkerQueue, RouterQueue, RouterQueue]]:
    """A worker's queue and two routers' queues on a fresh key prefix."""
    settings = SharedSettings(redis_url=redis_url, key_prefix=new_id("qs-replies"))
    worker = worker_queue(settings, "w1", block_ms=100)
    routers = router_queue(settings, "ra"), router_queue(settings, "rb")
    try:
        yield worker, *routers
    finally:
        for queue in (worker, *routers):
            await queue.close()


def _started(rid: str) -> pb.ChatEvent:
    return pb.ChatEvent(started=pb.Started(request_id=rid))


async def test_one_flush_is_one_entry_per_router_with_the_acknowledgements_after_it(
    queues: tuple[WorkerQueue, RouterQueue, RouterQueue],
) -> None:
    """Replies carry attempt and sequence; a job is acknowledged (lease done) in the same
    write as its last events, after them."""
    worker, router_a, router_b = queues
    await worker.ensure_group()
    job = jobs.make_job(chat(), router_id="ra", reply_stream="s", deadline_unix_ms=0, trace={})
    (entry_id,) = await router_a.submit([job])
    assert [e for e, _ in await worker.claim(1, 100)] == [entry_id]
    ref = AttemptRef(job.request_id, 0, "", entry_id)
    assert await worker.acquire(ref) == (False, None, False)
    writer = ReplyWriter(worker, "w1", window_s=0.0)
    written: list[bool] = []
    writer.put("r1", router_a.reply_stream, _started("r1"), attempt=2)
    writer.put("r1", router_a.reply_stream, _delta(0, "a", ids=(1,)), attempt=2)
    writer.put("r2", router_a.reply_stream, _delta(0, "b", ids=(2,)))
    writer.put("r3", router_b.reply_stream, _started("r3"))
    writer.end(("r1", 2), entry_id, ref, lambda: written.append(True))
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(writer.flush(), 30)
        writer.put("r2", router_a.reply_stream, _delta(0, "c", ids=(3,)))
        await asyncio.wait_for(writer.flush(), 30)
    finally:
        task.cancel()
    assert written == [True]
    assert await worker.redis.xlen(router_a.reply_stream) == 2
    assert await worker.redis.xlen(router_b.reply_stream) == 1
    replies = [r for _, r in await router_a.read_replies(b"0-0", 100) if r]
    assert [(r.request_id, r.attempt, r.seq, len(r.events)) for r in replies] == [
        ("r1", 2, 1, 2),
        ("r2", 0, 1, 1),
        ("r2", 0, 2, 1),
    ]
    assert await worker.pending_count() == 0
    lease = await worker.lease_of(job.request_id, 0)
    assert lease is not None and lease.done and lease.worker_id == "w1"


async def test_a_lease_goes_to_one_worker_and_a_fence_stops_it(
    queues: tuple[WorkerQueue, RouterQueue, RouterQueue],
) -> None:
    worker, router, _ = queues
    other = WorkerQueue(worker.redis, worker.keys, "w2", 5.0)
    ref = AttemptRef("q1", 0, "acme", b"1-1")
    assert await worker.acquire(ref) == (False, None, False)
    assert await worker.acquire(ref) == (False, None, True)  # taken before: a re-run
    check = await other.acquire(AttemptRef("q1", 0, "acme", b"1-1"))
    assert check.holder is not None and check.holder.worker_id == "w1"
    await router.announce_aborts([("q1", "other-tenant")])
    assert (await worker.audit([ref], touch=False))[0][:2] == (False, None)
    await router.announce_aborts([("q1", "acme")])
    assert (await worker.audit([ref], touch=False))[0][:2] == (True, None)
    await router.fence([("q1", 0)])
    (check,) = await worker.audit([ref], touch=False)
    assert check.holder is not None and check.holder.fenced


async def test_first_write_after_a_quiet_spell_does_not_wait_for_the_window(
    queues: tuple[WorkerQueue, RouterQueue, RouterQueue],
) -> None:
    worker, router, _ = queues
    writer = ReplyWriter(worker, "w1", window_s=600.0)
    task = asyncio.create_task(writer.run())
    try:
        writer.put("r1", router.reply_stream, _started("r1"))
        first = await router.read_replies(b"0-0", block_ms=20_000)
        assert [r.request_id for _, r in first if r] == ["r1"]
        # The next write waits for the window: nothing more arrives meanwhile.
        writer.put("r1", router.reply_stream, _delta(0, "a", ids=(1,)))
        assert await router.read_replies(first[-1][0], block_ms=500) == []
    finally:
        task.cancel()


async def test_routers_still_read_single_reply_entries(
    queues: tuple[WorkerQueue, RouterQueue, RouterQueue],
) -> None:
    """Entries of workers from before ReplyBatch (one Reply each) stay readable."""
    worker, router, _ = queues
    await worker.redis.xadd(router.reply_stream, encode(Reply(request_id="old")))  # type: ignore[arg-type]
    await worker.redis.xadd(router.reply_stream, {b"b": b"\xff\xff"})
    replies = await router.read_replies(b"0-0", 100)
    assert [r.request_id if r else None for _, r in replies] == ["old", None]
