"""Redis faults with streams in flight: a SIGKILL and restart, and CLIENT PAUSE.

The fault stack's redis-server keeps an append-only file (as the Kubernetes
manifests run it), so a restart loses nothing it acknowledged: streams wait
and continue with no gap and no repeat. A pause up to ``redis_outage_s``
(10 s) is ridden out; a longer one ends the streams with a retryable
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from transformers import AutoTokenizer

from qwen_serve_dev import devstack
from tests.fault_support import (
    PREFIX,
    FaultStack,
    Stub,
    assert_exact,
    await_workers,
    long_chat,
    outcome,
    run_stream,
    start_streams,
)
from tests.reliability import Outcome, Scenario, record
from tests.support.calls import chat, running_in_engines, wait_engines_idle

pytestmark = pytest.mark.e2e

OUTAGE_BOUND_S = 10.0  # the default redis_outage_s
RESTART_RUNS = int(os.environ.get("QS_REDIS_RESTART_RUNS", "1"))
"""``QS_REDIS_RESTART_RUNS=20`` repeats the restart test on one stack (20 in a row)."""


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(str(tiny_model))


async def _pause(stack: FaultStack, seconds: float) -> None:
    """CLIENT PAUSE ALL on the stack's Redis (as a failover or a slow fork can cause)."""
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        await client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    finally:
        await client.aclose()


async def _cancel_reaches_engine(stub: Stub, stack: FaultStack) -> float:
    """Seconds from a client cancel to no request running in the engines."""
    progress = asyncio.Event()
    task = asyncio.create_task(run_stream(stub, long_chat(99, 2000), progress))
    await asyncio.wait_for(progress.wait(), 120)
    deadline = time.monotonic() + 60
    while await running_in_engines(stack.redis_url, PREFIX) == 0:  # heartbeats lag ~1 s
        assert time.monotonic() < deadline, "the stream never showed in a heartbeat"
        await asyncio.sleep(0.2)
    cancelled = time.monotonic()
    task.cancel()
    assert await wait_engines_idle(stack.redis_url, PREFIX, timeout=60) == 0
    return time.monotonic() - cancelled


@pytest.mark.parametrize("run", range(RESTART_RUNS))
async def test_redis_restart_continues_streams(
    faults: FaultStack, fstub: Stub, tokenizer: object, run: int
) -> None:
    """SIGKILL redis-server mid-stream and start it again on its append-only file:
    every stream continues token-exact, a request sent meanwhile waits and completes,
    and a client cancel afterwards still reaches the engine."""
    await await_workers(faults, 2)
    tokens = 200
    tasks, _ = await start_streams(fstub, 4, tokens)
    killed = time.monotonic()
    faults.redis.kill()
    during = asyncio.create_task(run_stream(fstub, chat(max_tokens=4)))
    await asyncio.sleep(2)
    faults.redis, _ = devstack.start_redis(faults.log_dir, faults.redis_port, aof=True)
    streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 300))
    assert_exact(streams, tokens, tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
    waited = await during
    assert waited.complete, (waited.status, waited.error)
    cancel_s = await _cancel_reaches_engine(fstub, faults)
    result = outcome([*streams, waited], expected_tokens=None)
    result.recovery_s = waited.ended_at - killed
    result.note = (
        f"the request sent during the restart ended {result.recovery_s:.1f} s after the kill; "
        f"a client cancel after the restart left the engines idle within {cancel_s:.1f} s "
        "(heartbeat granularity 1 s)"
    )
    record(Scenario.REDIS_RESTART, result)


async def test_redis_pause_within_the_bound_is_ridden_out(
    faults: FaultStack, fstub: Stub, tokenizer: object
) -> None:
    """CLIENT PAUSE 5000 ALL: streams and a request sent during it all complete."""
    await await_workers(faults, 2)
    tokens = 200
    tasks, _ = await start_streams(fstub, 4, tokens)
    paused = time.monotonic()
    await _pause(faults, 5)
    during = await run_stream(fstub, chat(max_tokens=4))
    streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 300))
    assert during.complete, (during.status, during.error)
    assert_exact(streams, tokens, tokenizer.backend_tokenizer)  # type: ignore[attr-defined]
    result = outcome([*streams, during])
    result.recovery_s = during.ended_at - paused
    record(Scenario.REDIS_PAUSE, result)


async def test_redis_pause_beyond_the_bound_fails_streams_clearly(
    faults: FaultStack, fstub: Stub
) -> None:
    """A pause longer than redis_outage_s ends the streams with a retryable UNAVAILABLE;
    afterwards requests are served and nothing is left in the engines."""
    await await_workers(faults, 2)
    tasks, outs = await start_streams(fstub, 4, 3800)
    paused = time.monotonic()
    # A slow worker's first token can come after a fast worker's last: judge the streams
    # open at the pause. The pause outlasts the bound by 10 s: a process notices it only
    # when a read times out (up to 3 s late, more on a starved host), and counts from then.
    done_before = {id(s) for s in outs if s.ended_at}
    pause_s = OUTAGE_BOUND_S + 10
    await _pause(faults, pause_s)
    streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 120))
    open_at_pause = [s for s in streams if id(s) not in done_before]
    assert open_at_pause, "every stream ended before the pause"
    for stream in open_at_pause:
        assert stream.error is not None and stream.error.retryable, (stream, paused)
        assert stream.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    # The streams end once the bound is passed, while Redis is still paused: a request
    # sent then would be refused, by design (the test after this one). Send it after.
    await asyncio.sleep(max(0.0, paused + pause_s + 2 - time.monotonic()))
    after = await run_stream(fstub, chat(max_tokens=4))
    assert after.complete, (after.status, after.error)
    assert await wait_engines_idle(faults.redis_url, PREFIX, timeout=60) == 0
    result = outcome(open_at_pause)
    result.recovery_s = after.ended_at - paused
    record(Scenario.REDIS_LONG_PAUSE, result)


async def test_requests_are_refused_while_redis_is_down_beyond_the_bound(
    faults: FaultStack, fstub: Stub
) -> None:
    """Redis gone for longer than the bound: new calls get UNAVAILABLE, then are served."""
    faults.redis.kill()
    try:
        await asyncio.sleep(OUTAGE_BOUND_S + 3)
        refused = await run_stream(fstub, chat(max_tokens=4), timeout=30)
        assert refused.status == grpc.StatusCode.UNAVAILABLE
    finally:
        faults.redis, _ = devstack.start_redis(faults.log_dir, faults.redis_port, aof=True)
    devstack.wait_serving(faults.target, [faults.router], timeout=60)
    after = await run_stream(fstub, chat(max_tokens=4))
    assert after.complete, (after.status, after.error)
    record(Scenario.REDIS_DOWN, Outcome(1, 0, 1, 0, 0))
