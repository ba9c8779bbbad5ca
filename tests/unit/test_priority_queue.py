"""Priority across the queue, on a real Redis: HIGH jobs are claimed before NORMAL
before LOW, LOW still makes progress, and every step of a job's life (lease audit,
take-over, acknowledgement, dead letter, recovery checks) finds its entry in its
priority's stream."""

from __future__ import annotations

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import AttemptRef, RouterQueue
from qwen_serve.queue.codec import Job, job_priority
from qwen_serve.queue.worker_queue import LOW_SHARE
from router.jobs import make_job
from tests.conftest import QueueTrio
from tests.support.calls import chat

HIGH, NORMAL, LOW, UNSET = (
    pb.PRIORITY_HIGH,
    pb.PRIORITY_NORMAL,
    pb.PRIORITY_LOW,
    pb.PRIORITY_UNSPECIFIED,
)


def _job(priority: int, router: RouterQueue) -> Job:
    request = chat("hi", max_tokens=4)
    request.priority = priority  # type: ignore[assignment]
    return make_job(
        request,
        router_id=router.router_id,
        reply_stream=router.reply_stream,
        deadline_unix_ms=0,
        trace={},
    )


async def _submit(router: RouterQueue, *priorities: int) -> list[bytes]:
    return await router.submit([_job(p, router) for p in priorities])


def _priorities(claimed: list[tuple[bytes, Job | None]]) -> list[int]:
    return [job_priority(job) for _, job in claimed if job is not None]


async def test_high_is_claimed_before_normal_before_low(
    queues: QueueTrio,
) -> None:
    router, worker, _ = queues
    await _submit(router, LOW, LOW, NORMAL, UNSET, HIGH, LOW, HIGH)
    assert await router.queue_depth() == 7
    first = await worker.claim(3, block_ms=0)
    assert _priorities(first) == [HIGH, HIGH, NORMAL]
    rest = await worker.claim(10, block_ms=0)
    assert _priorities(rest) == [UNSET, LOW, LOW, LOW]
    assert await router.queue_depth() == 0
    assert await worker.pending_count() == 7


async def test_low_makes_progress_under_a_flood_of_high(
    queues: QueueTrio,
) -> None:
    router, worker, _ = queues
    await _submit(router, *[LOW] * 3, *[HIGH] * (3 * LOW_SHARE))
    order = []
    for _ in range(2 * LOW_SHARE + 2):
        order += _priorities(await worker.claim(1, block_ms=0))
    assert order.count(LOW) == 2, order
    assert order.index(LOW) == LOW_SHARE, order


async def test_a_blocked_claim_wakes_for_any_priority(
    queues: QueueTrio,
) -> None:
    router, worker, _ = queues
    for priority in (LOW, HIGH, NORMAL):
        await _submit(router, priority)
        claimed = await worker.claim(4, block_ms=200)
        assert _priorities(claimed) == [priority]
    assert await worker.claim(4, block_ms=100) == []


async def test_every_step_finds_the_entry_in_its_priority_stream(
    queues: QueueTrio,
) -> None:
    """Entry refs of HIGH and LOW jobs carry their stream: audit, hand-back, take-over,
    finish, dead letter and the router's recovery checks all reach the right entry."""
    router, worker, other = queues
    refs = await _submit(router, HIGH, LOW, NORMAL)
    assert refs[0].startswith(b"high/") and refs[1].startswith(b"low/") and b"/" not in refs[2]
    assert await router.undelivered(refs) == [True, True, True]
    claimed = await worker.claim(3, block_ms=0)
    assert [ref for ref, _ in claimed] == [refs[0], refs[2], refs[1]]  # HIGH, NORMAL, LOW
    assert await router.undelivered(refs) == [False, False, False]
    jobs = {ref: job for ref, job in claimed if job is not None}
    attempts = [AttemptRef(jobs[r].request_id, 0, "", r) for r in refs]
    checks = await worker.audit(attempts)  # takes the leases and touches the entries
    assert [c.holder for c in checks] == [None, None, None]
    states = await router.attempt_states([(a.request_id, 0, a.entry_id) for a in attempts])
    assert [pending for _, pending in states] == [True, True, True]

    orphaned = await other.orphaned({"worker-2"}, 10)
    assert sorted(orphaned) == sorted(("worker-1", r, 1) for r in refs)
    taken = await other.take_over(refs)
    assert sorted(ref for ref, _ in taken) == sorted(refs)
    await other.hand_back(refs[0], "worker-1")
    assert await worker.pending_count() == 1 and await other.pending_count() == 2

    await worker.finish(refs[0], attempts[0])
    await other.dead_letter(refs[1], jobs[refs[1]], "test")
    await other.finish(refs[2])
    states = await router.attempt_states([(a.request_id, 0, a.entry_id) for a in attempts])
    assert [pending for _, pending in states] == [False, False, False]
    assert await worker.pending_count() == 0 and await other.pending_count() == 0
    for stream in router.keys.job_streams:
        assert await router.redis.xlen(stream) == 0, stream


async def test_reserved_slots_take_only_high(
    queues: QueueTrio,
) -> None:
    """``others`` caps the NORMAL and LOW jobs of a claim (the worker's
    high_priority_reserve): with no room for them, only a HIGH job is claimed."""
    router, worker, _ = queues
    await _submit(router, NORMAL, NORMAL, LOW)
    assert _priorities(await worker.claim(3, block_ms=0, others=1)) == [NORMAL]
    assert await worker.claim(2, block_ms=100, others=0) == []
    await _submit(router, HIGH)
    assert _priorities(await worker.claim(2, block_ms=100, others=0)) == [HIGH]
    assert _priorities(await worker.claim(5, block_ms=0)) == [NORMAL, LOW]
