"""Prefix-aware placement: the key a job is placed by, the worker it goes to (rendezvous
ranking with a load bound), and the workers' own streams on a real Redis."""

from __future__ import annotations

from collections import Counter

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import Job, WorkerStatus
from qwen_serve.settings import RouterSettings
from router.channels import Channel
from router.jobs import make_job
from router.placement import Placer, choose, prefix_key, rank
from tests.conftest import QueueTrio
from tests.support.calls import chat


def _job(request: pb.ChatRequest | pb.GenerateRequest) -> Job:
    return make_job(request, router_id="r", reply_stream="s", deadline_unix_ms=0, trace={})


def _conversation(topic: str, turns: int) -> pb.ChatRequest:
    """A chat whose history has ``turns`` user turns (and the assistant's answers)."""
    request = pb.ChatRequest(sampling=pb.SamplingParams(max_tokens=4))
    request.messages.add(role=pb.ROLE_SYSTEM).content.add(text="You are terse.")
    for turn in range(turns):
        request.messages.add(role=pb.ROLE_USER).content.add(text=f"{topic}: question {turn}")
        if turn < turns - 1:
            request.messages.add(role=pb.ROLE_ASSISTANT).content.add(text=f"answer {turn}")
    return request


def _workers(*loads: int, capacity: int = 8) -> list[WorkerStatus]:
    return [
        WorkerStatus(worker_id=f"worker-{i}", capacity=capacity, running=load)
        for i, load in enumerate(loads)
    ]


def test_a_conversation_keeps_its_key_while_its_history_grows() -> None:
    keys = {prefix_key(_job(_conversation("tides", turns))) for turns in range(1, 7)}
    assert len(keys) == 1 and None not in keys
    assert prefix_key(_job(_conversation("volcanoes", 3))) not in keys


def test_an_image_in_the_opening_keys_by_its_head_and_size() -> None:
    def opening(data: bytes) -> Job:
        request = _conversation("tides", 1)
        request.messages[1].content.add().image.data = data
        return _job(request)

    big = b"\x89PNG" + bytes(8 * 1024 * 1024)
    assert prefix_key(opening(big)) == prefix_key(opening(big))
    assert prefix_key(opening(big)) != prefix_key(opening(big + b"\x00"))
    assert prefix_key(opening(big)) != prefix_key(_job(_conversation("tides", 1)))


def test_only_normal_first_attempts_are_placed() -> None:
    for priority in (pb.PRIORITY_HIGH, pb.PRIORITY_LOW):
        request = _conversation("tides", 2)
        request.priority = priority  # type: ignore[assignment]
        assert prefix_key(_job(request)) is None
    continued = _job(_conversation("tides", 2))
    continued.attempt = 1
    assert prefix_key(continued) is None
    generate = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(300))))
    longer = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(400))))
    assert prefix_key(_job(generate)) == prefix_key(_job(longer)) is not None


def test_keys_spread_over_the_workers_and_stay_put_when_one_leaves() -> None:
    ids = [f"worker-{i}" for i in range(3)]
    keys = [prefix_key(_job(_conversation(f"topic {i}", 1))) for i in range(300)]
    first = [rank(k, ids)[0] for k in keys if k]
    assert min(Counter(first).values()) > 60  # about 100 each
    without = [rank(k, ids[:2])[0] for k in keys if k]
    moved = sum(a != b for a, b in zip(first, without, strict=True) if a != "worker-2")
    assert moved == 0  # only the keys the gone worker held move


def test_the_load_bound_and_capacity_send_jobs_elsewhere() -> None:
    key = prefix_key(_job(_conversation("tides", 1)))
    assert key
    best, second = rank(key, ["worker-0", "worker-1"])
    loads = {best: 5, second: 0}
    workers = [WorkerStatus(worker_id=w, capacity=16, running=n) for w, n in loads.items()]
    assert choose(key, workers, {}, bound=1.25) == second  # 5 >= ceil(1.25 * 6 / 2)
    low = [WorkerStatus(worker_id=w, capacity=16, running=n) for w, n in {best: 2}.items()]
    assert choose(key, [*low, workers[1]], {}, bound=1.25) == best  # under the floor
    assert choose(key, workers, {}, bound=4.0) == best
    full = _workers(8, 8)
    assert choose(key, full, {}, bound=4.0) is None
    draining = [WorkerStatus(worker_id=best, capacity=8, draining=True)]
    assert choose(key, draining, {}, bound=1.25) is None


def test_a_skewed_workload_is_spread_within_the_bound() -> None:
    """Every request has the same key: the bound shares them out as load grows."""
    key = prefix_key(_job(_conversation("tides", 1)))
    assert key
    workers, placed = _workers(0, 0, 0, capacity=64), Counter[str]()
    for _ in range(60):
        worker = choose(key, workers, placed, bound=1.25)
        assert worker
        placed[worker] += 1
    assert max(placed.values()) <= 1.5 * 60 / 3, placed


def test_the_placer_moves_jobs_of_a_gone_or_slow_worker() -> None:
    placer = Placer(RouterSettings(placement=True, placement_wait_s=5.0))
    workers = _workers(0, 0)
    channels = [Channel(_job(_conversation(f"topic {i}", 1))) for i in range(8)]
    for channel in channels:
        channel.entry_id = b"1-0"
        assert placer.place(channel, workers)
    assert sum(len(v) for v in placer.open.values()) == 8
    started = channels[0]
    started.worker_id = gone = started.placed_on
    on_gone = [c.job.request_id for c in channels[1:] if c.placed_on == gone]
    overdue = placer.overdue(channels, live={w.worker_id for w in workers} - {gone})
    assert [(c.job.request_id, g) for c, g in overdue] == [(r, True) for r in on_gone]
    for channel, _ in overdue:  # the others wait up to 5 s
        placer.moved(channel)
    assert all(c.placed_on == "" for c, _ in overdue)
    assert placer.overdue(channels, live={w.worker_id for w in workers}) == []  # once each
    assert not placer.stalled(channels[1])
    for channel in channels:
        placer.ended(channel)
    assert sum(len(v) for v in placer.open.values()) == 0
    busy = _workers(5, 0)
    placer.refreshed(busy)  # a heartbeat shows 5 running on worker-0, none of them ours
    assert placer.loads(busy) == {"worker-0": 5, "worker-1": 0}
    off = Placer(RouterSettings(placement=False))
    assert off.place(Channel(_job(_conversation("tides", 1))), workers) == ""


async def test_a_placed_job_is_claimed_by_its_worker_only(
    queues: QueueTrio,
) -> None:
    router, owner, other = queues
    jobs = [_job(chat("hi", max_tokens=4)) for _ in range(3)]
    refs = await router.submit(jobs, placed=["worker-1", "", "worker-1"])
    assert refs[0].startswith(b"w:worker-1/") and b"/" not in refs[1]
    assert await router.queue_depth(["worker-1"]) == 3
    assert await router.undelivered(refs) == [True, True, True]
    assert await other.claim(8, block_ms=0) == [(refs[1], jobs[1])]
    assert [ref for ref, _ in await owner.claim(1, block_ms=0)] == [refs[0]]
    await router.drop(refs[2])  # moved to the shared stream: never claimed here
    assert await owner.claim(8, block_ms=100) == []
    assert await router.undelivered(refs[:2]) == [False, False]
    assert await owner.pending_count() == 1
    await owner.finish(refs[0])
    assert await owner.pending_count() == 0
    assert await router.redis.ttl(router.keys.worker_jobs("worker-1")) > 0
