"""Tenant limits across routers: three routers share one tenant's in-flight cap of 4
(issue 17).

One real stack: redis-server, one worker with the CPU engine and three routers, each
with the same API-key file and limits file (``alpha inflight=4``). ``requests``
streams of tenant alpha start at once, spread round-robin over the routers; the
client records when each admitted stream started and ended, and the most that ran at
once is computed from those intervals (Started to Usage: the router takes the slot
before Started and frees it as Usage goes out). Refusals must be RESOURCE_EXHAUSTED with a
retry hint, after which the client sends it again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.tables import table
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_dev import devstack
from qwen_serve_dev.overlap import most_at_once

logger = logging.getLogger(__name__)

PREFIX = "qs-bench-quotas"
CAP = 4


async def _stream(target: str, key: str, tokens: int) -> tuple[float, float, list[str]]:
    """(start, end) of the stream and the refusals before it: a refused call is sent
    again after its retry hint, as a client should."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[100, 200, 300, 400]),
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )
    refusals: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        while True:
            call = stub.Generate(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=300
            )
            first = last = 0.0
            try:
                async for event in call:
                    first = first or time.monotonic()
                    if event.WhichOneof("event") == "usage":
                        last = time.monotonic()  # the router frees the slot with it
                return first, last or time.monotonic(), refusals
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                hint = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms", "0")
                refusals.append(f"{exc.code().name} (retry hint {hint} ms)")
                await asyncio.sleep(int(str(hint)) / 1000)


def run(quick: bool) -> dict[str, Any]:
    """Start the stack, send the burst, summarise."""
    requests, tokens = (16, 32) if quick else (48, 64)
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="qs-bench-quotas-") as tmp:
        log_dir = Path(tmp)
        keys, limits = log_dir / "keys", log_dir / "limits"
        keys.write_text(f"alpha:{key}\n")
        keys.chmod(0o600)
        limits.write_text(f"alpha inflight={CAP}\n")
        redis, url = devstack.start_redis(log_dir)
        procs = [redis, devstack.start_worker(url, log_dir, "--key-prefix", PREFIX, name="w")]
        targets = []
        for i in range(3):
            port = devstack.free_port()
            flags = [PREFIX, "--api-keys-file", str(keys), "--tenant-limits-file", str(limits)]
            procs.append(
                devstack.start_router(
                    url, port, log_dir, "--key-prefix", *flags, name=f"router-{i}"
                )
            )
            targets.append(f"127.0.0.1:{port}")
        try:
            for target in targets:
                devstack.wait_serving(target, procs)
            logger.info("quotas: %d streams over 3 routers", requests)
            burst = [_stream(targets[i % 3], key, tokens) for i in range(requests)]
            results = asyncio.run(_gather(burst))
        finally:
            for proc in reversed(procs):
                proc.stop()
    refused = [r for _, _, refusals in results for r in refusals]
    return {
        "routers": 3,
        "cap": CAP,
        "requests": requests,
        "tokens": tokens,
        "completed": len(results),
        "most_at_once": most_at_once([(a, b) for a, b, _ in results]),
        "refusals": sorted(set(refused)),
        "refused": len(refused),
    }


async def _gather(calls: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*calls))


def section(data: dict[str, Any]) -> list[str]:
    """The tenant-limits section of docs/benchmarks.md."""
    if not data:
        return ["Not measured yet: `python -m bench quotas`."]
    rows = [
        (
            data["routers"],
            data["cap"],
            data["requests"],
            data["completed"],
            data["most_at_once"],
            data["refused"],
            "; ".join(data["refusals"]) or "-",
        )
    ]
    header = (
        "routers",
        "in-flight cap",
        "sent at once",
        "completed",
        "most at once",
        "refusals",
        "refused with",
    )
    return [
        "`python -m bench quotas` (about 2 minutes): one tenant's streams "
        f"({data['tokens']} tokens each) sent at once, round-robin over three routers that "
        "share its in-flight cap through Redis; a refused call is sent again after its retry "
        "hint. Goal: never more than the cap at once, and every stream served in the end.",
        "",
        *table(header, rows),
    ]
