"""Full concurrency with and without a slot kept for HIGH priority (issue 13).

The router and the product's worker loop on the SIMULATED engine (``bench.sim_worker``,
so the engine is not what limits), ``capacity`` slots, and ``capacity`` client streams
sending two requests each, back to back, like the GPU benchmark's closed loop. Two
cases, each on a fresh stack:

- **no HIGH traffic**: the worker runs every slot (``high_priority_reserve`` is held
  only once HIGH jobs come);
- **after a HIGH job**: one slot stays free for HIGH (``high_priority_reserve`` 1), so
  one stream waits for a whole request before its first starts.

The second case is what every run at concurrency = capacity paid before the reserve
was made conditional: the run lasts three request durations instead of two.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import stack
from bench.engine_path import make_prompts
from bench.load_runners import ours_runner
from bench.tables import table
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_dev import devstack

logger = logging.getLogger(__name__)

CAPACITY, TOKENS, RATE = 32, 64, 20.0
CASES = {"no HIGH traffic": False, "after a HIGH job": True}


def _send_high(target: str) -> None:
    """One HIGH request, to completion (the worker then keeps its HIGH slot)."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 6, 7]),
        sampling=pb.SamplingParams(max_tokens=1),
        priority=pb.PRIORITY_HIGH,
    )
    with grpc.insecure_channel(target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        for _ in stub.Generate(request, timeout=60):
            pass


def _case(high_first: bool, rounds: int) -> dict[str, Any]:
    log = Path(tempfile.mkdtemp(prefix="qs-bench-reserve-"))
    redis, url = devstack.start_redis(log)
    extra = ("--capacity", str(CAPACITY))
    sim = stack.start_sim_worker(url, log, TOKENS, RATE, 2.0, name="sim-worker", extra=extra)
    router, target = stack.start_router(url, log, ())
    try:
        stack.wait_grpc(target, router, timeout=60)
        time.sleep(2)  # the router sees the worker's heartbeat
        if high_first:
            _send_high(target)
        walls, rates = [], []
        for turn in range(rounds):
            run = ours_runner(target, Path(tempfile.mkdtemp()), 1)
            started = time.monotonic()
            report = run(make_prompts(CAPACITY * 2, 7 + turn), CAPACITY, TOKENS, f"r{turn}")
            walls.append(round(time.monotonic() - started, 2))
            rates.append(round(report["streaming"]["tokensPerSecond"], 1))
        return {"wall_s": walls, "tokens_per_s": rates}
    finally:
        for proc in (router, sim, redis):
            proc.stop(10)


def run(quick: bool) -> dict[str, Any]:
    """Both cases, 2 rounds each (1 with ``quick``)."""
    rounds = 1 if quick else 2
    results = {name: _case(high, rounds) for name, high in CASES.items()}
    request_s = TOKENS / RATE
    return {
        "capacity": CAPACITY,
        "tokens": TOKENS,
        "rate": RATE,
        "request_s": request_s,
        "cases": results,
    }


def section(data: dict[str, Any]) -> list[str]:
    """The full-concurrency section of docs/benchmarks.md."""
    if not data:
        return ["Not measured yet: `python -m bench reserve`."]
    rows = [
        (
            name,
            ", ".join(f"{w:.1f}" for w in case["wall_s"]),
            ", ".join(f"{r:,.0f}" for r in case["tokens_per_s"]),
            f"{max(case['wall_s']) / data['request_s']:.1f}",
        )
        for name, case in data["cases"].items()
    ]
    header = ("case", "wall (s)", "tokens/s", "request durations")
    return [
        "`python -m bench reserve` (about 1 minute): the router and the worker loop on the",
        f"simulated engine, {data['capacity']} slots and {data['capacity']} client streams",
        f"of two {data['tokens']}-token requests each ({data['request_s']:.1f} s per request),",
        "each case on a fresh stack. Two request durations is the ideal.",
        "",
        *table(header, rows),
    ]
