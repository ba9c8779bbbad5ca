"""Priority across the queue: time to first token of HIGH, NORMAL and LOW requests on
an idle stack and under a flood of LOW requests (issue 17).

One real stack per configuration: redis-server, one worker with the CPU engine
(``cpu-tiny``: 8 engine slots) and a router. A flood of LOW streams (more than the
engine's slots, so LOW jobs queue in Redis) runs back-to-back; meanwhile probes of
each priority are sent one at a time and their time to first token is measured
at the client. The same probes on the idle stack are the reference. Two
configurations run: the default (``high_priority_reserve`` 1: one engine slot kept
for HIGH once a HIGH job has come, so the first HIGH probe may wait for a slot) and
``--high-priority-reserve 0`` (priority streams only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import stack
from bench.tables import table
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_dev import devstack

logger = logging.getLogger(__name__)

PRIORITIES = {"HIGH": pb.PRIORITY_HIGH, "NORMAL": pb.PRIORITY_NORMAL, "LOW": pb.PRIORITY_LOW}
ROUTER_FLAGS = ("--max-inflight-per-tenant", "100000", "--max-queue-depth", "100000")


@dataclass(frozen=True)
class Workload:
    """Flood size and probe counts."""

    flood_streams: int = 32
    flood_tokens: int = 128
    probes: int = 8
    probe_tokens: int = 8
    settle_s: float = 5.0

    @classmethod
    def of(cls, quick: bool) -> Workload:
        """The full or the --quick workload."""
        return cls(flood_streams=24, probes=4, settle_s=3.0) if quick else cls()


def _request(i: int, priority: int, tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[100 + i % 2000, 200, 300, 400]),
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
        priority=priority,  # type: ignore[arg-type]
    )


async def _ttft(stub: serve_pb2_grpc.InferenceStub, request: pb.GenerateRequest) -> float:
    """Seconds from the call to its first token; the stream is read to its end."""
    began, first = time.perf_counter(), 0.0
    async for event in stub.Generate(request, timeout=600):
        if event.WhichOneof("event") == "delta" and event.delta.token_ids and not first:
            first = time.perf_counter() - began
    if not first:
        raise RuntimeError("a probe ended without tokens")
    return first


async def _probe_all(
    stub: serve_pb2_grpc.InferenceStub, load: Workload, seed: int
) -> dict[str, list[float]]:
    """Probes of every priority, interleaved, one at a time."""
    out: dict[str, list[float]] = {name: [] for name in PRIORITIES}
    for i in range(load.probes):
        for name, priority in PRIORITIES.items():
            request = _request(seed + i, priority, load.probe_tokens)
            out[name].append(await _ttft(stub, request))
    return out


async def _flood(stub: serve_pb2_grpc.InferenceStub, load: Workload, stop: asyncio.Event) -> int:
    """LOW streams back-to-back until ``stop``; how many completed."""
    done = 0

    async def one_stream(i: int) -> None:
        nonlocal done
        while not stop.is_set():
            request = _request(1000 + i, pb.PRIORITY_LOW, load.flood_tokens)
            async for _ in stub.Generate(request, timeout=600):
                pass
            done += 1

    tasks = [asyncio.create_task(one_stream(i)) for i in range(load.flood_streams)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
    return done


async def _measure(target: str, load: Workload) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        await _probe_all(stub, Workload(probes=2), seed=0)  # warm-up
        idle = await _probe_all(stub, load, seed=100)
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(stub, load, stop))
        await asyncio.sleep(load.settle_s)  # the engine full and LOW jobs queued
        busy = await _probe_all(stub, load, seed=200)
        stop.set()
        completed = await flood
    return {"idle": idle, "flood": busy, "flood_completed": completed}


def _summary(samples: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for name in PRIORITIES:
        idle = statistics.median(samples["idle"][name]) * 1000
        busy = sorted(samples["flood"][name])
        out[name] = {
            "idle_p50_ms": idle,
            "flood_p50_ms": statistics.median(busy) * 1000,
            "flood_max_ms": busy[-1] * 1000,
            "ratio_p50": statistics.median(busy) * 1000 / idle,
        }
    return out


def run_config(label: str, worker_flags: tuple[str, ...], load: Workload) -> dict[str, Any]:
    """One stack with ``worker_flags``: the probes idle and under the flood."""
    with tempfile.TemporaryDirectory(prefix="qs-bench-priority-") as tmp:
        procs = stack.start_our_stack(Path(tmp), ROUTER_FLAGS, worker_flags=worker_flags)
        try:
            target = stack.target_of(procs["router"])
            devstack.wait_serving(target, list(procs.values()))
            logger.info("priority: %s: measuring", label)
            samples = asyncio.run(_measure(target, load))
        finally:
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {
        "label": label,
        "worker_flags": list(worker_flags),
        **samples,
        "summary": _summary(samples),
    }


def run(quick: bool) -> dict[str, Any]:
    """Both configurations; the results ``python -m bench render`` tabulates."""
    load = Workload.of(quick)
    configs = [
        ("priority streams + 1 slot kept for HIGH once HIGH jobs come (default)", ()),
        ("priority streams only (--high-priority-reserve 0)", ("--high-priority-reserve", "0")),
    ]
    return {
        "workload": load.__dict__,
        "engine_args": stack.recorded_args(stack.engine_profile()),
        "configs": [run_config(label, flags, load) for label, flags in configs],
    }


def section(data: dict[str, Any]) -> list[str]:
    """The priority section of docs/benchmarks.md."""
    if not data:
        return ["Not measured yet: `python -m bench priority`."]
    load = data["workload"]
    lines = [
        f"`python -m bench priority` (about 4 minutes): one worker (`cpu-tiny`, 8 engine "
        f"slots) under {load['flood_streams']} back-to-back LOW streams of "
        f"{load['flood_tokens']} tokens; {load['probes']} probes of each priority "
        f"({load['probe_tokens']} tokens), one at a time, idle and under the flood. "
        "Time to first token at the client; goal: HIGH under the flood within 2x idle.",
        "",
    ]
    for config in data["configs"]:
        rows = [
            (
                name,
                f"{s['idle_p50_ms']:.0f}",
                f"{s['flood_p50_ms']:.0f}",
                f"{s['flood_max_ms']:.0f}",
                f"{s['ratio_p50']:.1f}x",
            )
            for name, s in config["summary"].items()
        ]
        lines += [f"**{config['label']}** ({config['flood_completed']} LOW streams completed)", ""]
        header = ("priority", "idle p50 ms", "flood p50 ms", "flood max ms", "flood/idle")
        lines += [*table(header, rows), ""]
    return lines
