"""``--procs N``: the same load from N client processes, reported as one run.

One Python process reads a few tens of thousands of stream messages a second; past
that the client, not the server, sets the figures. Each process takes an equal share
of the load, prepares itself (resolves the method, opens its channels), waits at a
barrier so that all start together, and sends its calls back; the parent merges them
(latencies, token arrival times, the per-100-ms token timeline) into one report.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from loadtest.options import Options
from loadtest.runner import RunResult

START_TIMEOUT_S = 120.0
T = TypeVar("T")
Prepare = Callable[[T], Callable[[], Awaitable[RunResult]]]
"""Runs in a child: sets up one share of the load and returns the coroutine that runs it."""


def split(value: int, index: int, procs: int) -> int:
    """Process ``index``'s part of ``value`` split over ``procs`` (the first ones take more)."""
    return value // procs + (1 if index < value % procs else 0)


def share(options: Options, index: int, procs: int) -> Options:
    """Process ``index``'s part of the load (concurrency, total and connections split)."""
    return dataclasses.replace(
        options,
        concurrency=max(1, split(options.concurrency, index, procs)),
        total=split(options.total, index, procs),
        connections=max(1, split(options.connections, index, procs)),
        progress=False,
        procs=1,
    )


def merge(parts: list[RunResult]) -> RunResult:
    """One run of every process's calls; the wall time of the slowest process."""
    timeline: list[int] = []
    for run in parts:
        if len(run.timeline) > len(timeline):
            timeline.extend([0] * (len(run.timeline) - len(timeline)))
        for i, tokens in enumerate(run.timeline):
            timeline[i] += tokens
    calls = sorted((c for run in parts for c in run.calls), key=lambda c: c.start_unix_ns)
    reasons = {run.end_reason for run in parts}
    return RunResult(
        calls=calls,
        total_ns=max((run.total_ns for run in parts), default=0),
        end_reason="timeout" if "timeout" in reasons else "normal",
        timeline=timeline,
    )


def run_processes(prepare: Prepare[T], shares: list[T]) -> RunResult:
    """Run each share in its own process (``prepare`` must be a module-level function)."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(len(shares))
    results: Any = context.Queue()
    children = [
        context.Process(target=_child, args=(prepare, part, barrier, results)) for part in shares
    ]
    for child in children:
        child.start()
    parts = [_receive(results, children) for _ in children]
    for child in children:
        child.join()
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"a load process failed: {failed[0]}")
    return merge([p for p in parts if isinstance(p, RunResult)])


def run_grpc_processes(options: Options) -> RunResult:
    """``python -m loadtest --procs N``: the gRPC load split over N processes."""
    shares = [share(options, i, options.procs) for i in range(options.procs)]
    return run_processes(prepare_grpc, [s for s in shares if s.total or s.duration_s])


def prepare_grpc(options: Options) -> Callable[[], Awaitable[RunResult]]:
    """A child's gRPC load: the method resolved by reflection, the runner built."""
    from loadtest.reflect import resolve_at
    from loadtest.runner import Runner

    reflect_metadata = (
        options.metadata if options.reflect_metadata is None else options.reflect_metadata
    )
    method = resolve_at(
        options.host,
        options.call,
        options.insecure,
        min(options.timeout_s or 10, 10),
        reflect_metadata,
    )
    return Runner(options, method).run


def _receive(results: Any, children: list[Any]) -> RunResult | str:
    """The next process's result; gives up once every process has exited without one."""
    while True:
        try:
            item: RunResult | str = results.get(timeout=1.0)
            return item
        except queue.Empty:
            if not any(child.is_alive() for child in children):
                return "every load process exited without a result"


def _child(prepare: Prepare[Any], part: Any, barrier: Any, results: Any) -> None:
    from qwen_serve import aio

    try:
        start = prepare(part)
        barrier.wait(timeout=START_TIMEOUT_S)
        results.put(aio.run(_call(start)))
    except Exception as exc:  # reported by the parent
        results.put(f"{type(exc).__name__}: {exc}")


async def _call(start: Callable[[], Awaitable[RunResult]]) -> RunResult:
    return await start()
