"""Fencing, outages and Sentinel URLs: the pure pieces, no network."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.outage import Outage, every
from qwen_serve.queue.broker import QueueUnavailable
from qwen_serve.queue.codec import Job, Lease, Reply, decode_lease
from qwen_serve.queue.connection import parse_sentinel_url, redis_errors_as_unavailable
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import WorkerSettings
from router import jobs
from router.channels import Channel, Verdict
from tests.support.calls import chat


def _job(attempt: int = 0) -> Job:
    job = jobs.make_job(chat(), router_id="r", reply_stream="s", deadline_unix_ms=0, trace={})
    job.attempt = attempt
    return job


def _delta(*ids: int) -> pb.ChatEvent:
    return pb.ChatEvent(delta=pb.Delta(index=0, token_ids=list(ids)))


def _reply(worker: str, attempt: int, seq: int, *events: pb.ChatEvent) -> Reply:
    return Reply(request_id="q", worker_id=worker, attempt=attempt, seq=seq, events=events)


async def _drain(channel: Channel) -> list[pb.ChatEvent]:
    return [await channel.events.get() for _ in range(len(channel.events))]


async def test_current_attempt_of_its_first_worker_only() -> None:
    channel = Channel(_job())
    started = pb.ChatEvent(started=pb.Started(request_id="q"))
    assert channel.accept(_reply("w1", 0, 1, started, _delta(1))) is Verdict.DELIVERED
    assert channel.accept(_reply("w2", 0, 2, _delta(9))) is Verdict.STALE
    assert channel.accept(_reply("w1", 1, 2, _delta(9))) is Verdict.STALE
    assert channel.accept(_reply("w1", 0, 1, _delta(1))) is Verdict.REPEATED
    assert channel.accept(_reply("w1", 0, 2, _delta(2))) is Verdict.DELIVERED
    assert channel.token_ids == [1, 2]
    assert [e.WhichOneof("event") for e in await _drain(channel)] == ["started", "delta"]


def test_a_gap_or_a_lost_attempt_asks_for_a_continuation() -> None:
    channel = Channel(_job())
    channel.accept(_reply("w1", 0, 1, _delta(1)))
    assert channel.accept(_reply("w1", 0, 3, _delta(3))) is Verdict.LOST
    lost = Reply(request_id="q", worker_id="w1", attempt=0, attempt_lost=True)
    assert channel.accept(lost) is Verdict.LOST
    other = Reply(request_id="q", worker_id="w2", attempt=0, attempt_lost=True)
    assert channel.accept(other) is Verdict.STALE  # not the worker the client hears


def test_next_attempt_fences_the_previous_one() -> None:
    channel = Channel(_job())
    channel.accept(_reply("w1", 0, 1, _delta(1, 2)))
    channel.next_attempt(jobs.continuation_job(channel.job, channel.token_ids))
    assert channel.attempt == 1 and list(channel.job.continuation_token_ids) == [1, 2]
    assert channel.accept(_reply("w1", 0, 2, _delta(3))) is Verdict.STALE
    assert channel.accept(_reply("w2", 1, 1, _delta(3))) is Verdict.DELIVERED
    assert channel.token_ids == [1, 2, 3]


def test_replies_of_older_workers_are_accepted_unless_their_worker_was_lost() -> None:
    channel = Channel(_job())
    assert channel.accept(Reply(request_id="q", worker_id="old", events=[_delta(1)])) is (
        Verdict.DELIVERED
    )
    channel.next_attempt(jobs.continuation_job(channel.job, channel.token_ids))
    assert channel.accept(Reply(request_id="q", worker_id="old", events=[_delta(2)])) is (
        Verdict.STALE
    )


async def test_end_aborted_closes_with_abort_and_usage_so_far() -> None:
    request = chat()
    request.sampling.n = 2
    job = jobs.make_job(request, router_id="r", reply_stream="s", deadline_unix_ms=0, trace={})
    channel = Channel(job)
    channel.accept(_reply("w1", 0, 1, _delta(1, 2)))
    channel.end_aborted()
    events = await _drain(channel)
    assert [e.finished.reason for e in events if e.HasField("finished")] == [
        pb.FINISH_REASON_ABORT
    ] * 2
    assert events[-1].usage.completion_tokens == 2
    assert channel.closed
    assert channel.accept(_reply("w1", 0, 2, _delta(3))) is Verdict.STALE


def test_outage_grace_widens_heartbeats_for_a_ttl_after_it() -> None:
    outage = Outage(bound_s=10.0, ttl_s=60.0)
    assert outage.grace_ms() == 0 and not outage.ongoing
    outage.failed()
    assert outage.ongoing and not outage.beyond_bound()
    assert outage.succeeded()
    assert not outage.succeeded()
    assert outage.grace_ms() >= 0
    outage.bound_s = 0.0
    outage.failed()
    assert outage.beyond_bound() or outage.lasted() == 0.0


def test_a_stall_of_this_process_widens_heartbeats_like_a_slow_call() -> None:
    outage = Outage(bound_s=10.0, ttl_s=60.0)
    outage.stalled(0.5)  # ordinary scheduling jitter: nothing
    assert outage.grace_ms() == 0
    outage.stalled(3.0)
    assert outage.grace_ms() == 3000 and not outage.ongoing
    outage.stalled(2.0)  # a shorter stall within the TTL keeps the wider window
    assert outage.grace_ms() == 3000
    assert not outage.succeeded(took=0.1) and outage.grace_ms() == 3000


async def test_every_counts_a_round_that_could_not_run_as_a_stall() -> None:
    outage, ticks = Outage(bound_s=10.0, ttl_s=60.0), []

    async def tick() -> None:
        ticks.append(outage.grace_ms())
        if len(ticks) == 1:
            time.sleep(1.6)  # noqa: ASYNC251 (a stall: the next round comes 1.6 s late)
        else:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await every(0.01, outage, tick)
    assert ticks[1] >= 1500, ticks


def test_lease_values_and_keys() -> None:
    lease = Lease(worker_id="w", entry_id="1-0")
    assert decode_lease(lease.SerializeToString()) == lease
    assert decode_lease(b"worker-123abc").worker_id == "worker-123abc"  # older workers
    assert decode_lease(Lease(fenced=True).SerializeToString()).fenced
    keys = Keys("p")
    assert keys.lease("q", 0) == "p:started:q"
    assert keys.lease("q", 2) == "p:started:q:2"
    assert keys.abort_marker("q") == "p:abort:q"
    assert keys.abort_marker("q", "acme") == "p:abort:q:acme"


def test_sentinel_urls() -> None:
    url = parse_sentinel_url("redis+sentinel://qs:p%40ss@h1:26380,h2,[::1]:5/mymaster/2")
    assert url.sentinels == [("h1", 26380), ("h2", 26379), ("::1", 5)]
    assert (url.service, url.db, url.username, url.password, url.tls) == (
        "mymaster",
        2,
        "qs",
        "p@ss",
        False,
    )
    assert parse_sentinel_url("rediss+sentinel://h/svc").tls
    for bad in ("redis://h/0", "redis+sentinel://h", "redis+sentinel:///svc"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


def test_reclaim_bound_must_cover_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="reclaim_unstarted_s"):
        WorkerSettings(reclaim_unstarted_s=1.0, heartbeat_interval_s=1.0)


def test_uvloops_closed_transport_error_is_an_outage() -> None:
    closed = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
    with pytest.raises(QueueUnavailable), redis_errors_as_unavailable():
        raise RuntimeError(closed)
    with pytest.raises(RuntimeError, match="a bug"), redis_errors_as_unavailable():
        raise RuntimeError("a bug")
