"""Tenant limits held in Redis (router/quotas.py): exact across routers.

The script runs against a real redis-server; the end-to-end test runs three
real routers on the shared stack's Redis and worker, with API keys and a limits file.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.errors import RESOURCE_EXHAUSTED, RequestError
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import new_id
from qwen_serve_dev import devstack
from qwen_serve_dev.overlap import most_at_once
from router import quotas
from router.quotas import Quotas, TenantLimits, parse_limits
from tests.conftest import Stack
from tests.security_support import bearer, write_keys_file
from tests.support.calls import wait_engines_idle

LIMITS = "# tenant limits\nalpha inflight=4  # a comment\nbeta rpm=2\n* tpm=1000000\n"


def test_limits_file_lines_and_the_default() -> None:
    limits = parse_limits(LIMITS.splitlines(), "limits")
    assert limits == {
        "alpha": TenantLimits(inflight=4),
        "beta": TenantLimits(rpm=2),
        "*": TenantLimits(tpm=1_000_000),
    }
    q = Quotas(aioredis.Redis(), Keys(), limits, 500)
    assert q.of("alpha").inflight == 4 and q.of("other").tpm == 1_000_000 and q.of("").tpm


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha inflight=x", "limits:1: expected inflight=N"),
        ("alpha\nalpha rpm=1", "limits:2: tenant 'alpha' is listed twice"),
        ("al/pha rpm=1", "limits:1: a tenant is"),
        ("alpha burst=3", "limits:1: expected inflight=N, rpm=N or tpm=N, got 'burst=3'"),
    ],
)
def test_a_bad_limits_line_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_limits(text.splitlines(), "limits")


def _quotas(url: str, limits: dict[str, TenantLimits], prefix: str) -> Quotas:
    return Quotas(aioredis.Redis.from_url(url), Keys(prefix), limits, 750)


async def _admitted(q: Quotas, tenant: str, request_id: str) -> bool:
    try:
        return await q.admit(tenant, request_id)
    except RequestError as exc:
        assert exc.code == RESOURCE_EXHAUSTED and exc.retryable and exc.retry_after_ms
        return False


async def test_concurrent_routers_admit_exactly_the_inflight_limit(redis_url: str) -> None:
    limits = {"alpha": TenantLimits(inflight=4)}
    prefix = new_id("qt")
    routers = [_quotas(redis_url, limits, prefix) for _ in range(3)]
    ids = [f"r{i}" for i in range(30)]
    results = await asyncio.gather(
        *(_admitted(routers[i % 3], "alpha", rid) for i, rid in enumerate(ids))
    )
    admitted = [rid for rid, ok in zip(ids, results, strict=True) if ok]
    assert len(admitted) == 4
    with pytest.raises(RequestError, match=r"'alpha' has 4 streams open \(limit 4\)") as refused:
        await routers[0].admit("alpha", "one-more")
    assert refused.value.retry_after_ms == 750
    await routers[1].release("alpha", admitted[0])  # any router may free a slot
    assert await routers[2].admit("alpha", "after-release")
    assert not await routers[0].admit("unlimited", "x")  # no limits: nothing held


async def _away_from_a_minute_edge() -> None:
    """Wait for the next minute if this one ends within 15 s (its counts would reset)."""
    left_ms = quotas.MINUTE_MS - int(time.time() * 1000) % quotas.MINUTE_MS
    if left_ms < 15_000:
        await asyncio.sleep(left_ms / 1000 + 0.1)


async def test_requests_and_tokens_per_minute(redis_url: str) -> None:
    await _away_from_a_minute_edge()
    limits = {"beta": TenantLimits(rpm=2), "gamma": TenantLimits(tpm=100)}
    q = _quotas(redis_url, limits, new_id("qt"))
    assert await q.admit("beta", "b1") and await q.admit("beta", "b2")
    with pytest.raises(RequestError, match="used 2 requests this minute") as refused:
        await q.admit("beta", "b3")
    assert 0 < (refused.value.retry_after_ms or 0) <= quotas.MINUTE_MS
    assert await q.admit("gamma", "g1")
    await q.charge("gamma", 100)
    with pytest.raises(RequestError, match="used 100 tokens this minute"):
        await q.admit("gamma", "g2")


async def test_a_dead_routers_slots_expire(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q = _quotas(redis_url, {"alpha": TenantLimits(inflight=1)}, new_id("qt"))
    monkeypatch.setattr(quotas, "QUOTA_HOLD_S", 0.3)
    assert await q.admit("alpha", "held")
    await q.refresh([("alpha", "held")])  # a live router keeps its slot
    with pytest.raises(RequestError):
        await q.admit("alpha", "second")
    await asyncio.sleep(0.5)  # no refresh: its router is gone
    assert await q.admit("alpha", "second")


# ------------------------------------------------------------------ end to end


def _generate(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(range(1000, 1016))),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def _timed_stream(
    target: str, tenant: str, max_tokens: int
) -> tuple[float, float] | grpc.aio.AioRpcError:
    """(first event, end) times of an admitted stream, or the status it was refused with."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = serve_pb2_grpc.InferenceStub(channel).Generate(
            _generate(max_tokens), metadata=bearer(tenant), timeout=300
        )
        try:
            first = None
            async for event in call:
                first = first or time.monotonic()
                assert not event.HasField("error"), event
            assert first is not None
            return first, time.monotonic()
        except grpc.aio.AioRpcError as exc:
            return exc


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0].endswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_three_routers_never_run_more_than_the_tenants_inflight_cap(
    stack: Stack, tmp_path: Path
) -> None:
    keys_file = write_keys_file(tmp_path / "keys")
    limits_file = tmp_path / "limits"
    limits_file.write_text("alpha inflight=4\nbeta rpm=2\n")
    ports = [devstack.free_port() for _ in range(3)]
    routers = [
        stack.router(
            "--api-keys-file",
            keys_file,
            "--tenant-limits-file",
            str(limits_file),
            "--metrics-port",
            str(port),
            name=f"router-limits-{i}",
        )
        for i, port in enumerate(ports)
    ]
    try:
        targets = [target for _, target in routers]
        results = await asyncio.gather(
            *(_timed_stream(targets[i % 3], "alpha", 48) for i in range(12))
        )
        admitted = [r for r in results if isinstance(r, tuple)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert admitted and refused
        assert most_at_once(admitted) <= 4
        for status in refused:
            assert status.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'alpha' has 4 streams open" in (status.details() or "")
            assert int(dict(status.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0
        limited = sum(
            _metric(p, "qwen_serve_tenant_requests_total", outcome="limited", tenant="alpha")
            for p in ports
        )
        assert limited == len(refused)
        assert sum(
            _metric(p, "qwen_serve_tenant_tokens_total", tenant="alpha", type="output")
            for p in ports
        ) == 48 * len(admitted)
        # beta: two requests a minute, whichever router they reach
        await _away_from_a_minute_edge()
        assert isinstance(await _timed_stream(targets[0], "beta", 2), tuple)
        assert isinstance(await _timed_stream(targets[1], "beta", 2), tuple)
        third = await _timed_stream(targets[2], "beta", 2)
        assert isinstance(third, grpc.aio.AioRpcError)
        assert "used 2 requests this minute" in (third.details() or "")
        # every slot came back: alpha streams again
        assert isinstance(await _timed_stream(targets[2], "alpha", 2), tuple)
    finally:
        for proc, _ in routers:
            proc.stop()
        await wait_engines_idle(stack.redis_url, stack.key_prefix)
