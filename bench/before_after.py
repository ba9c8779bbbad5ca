"""Before/after figures for the proposed hot-path changes, at 1,000 streams.

Each variant is a fresh capacity stack (Redis, simulated worker, router) whose
router runs with ``bench.experiments`` patches, or whose simulated worker uses
another coalescing window; the baseline is the product's router unchanged. The
variants take turns, their order reversed every round.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import capacity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One configuration to measure."""

    name: str
    patches: tuple[str, ...] = ()
    coalesce_ms: float = 2.0
    sim_loop: str = "asyncio"


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline (product as is)"),
    Variant("baseline again (the merge patch is a no-op now: merging is in the product)"),
    Variant("router: gc thresholds", ("gc",)),
    Variant("queue: one reply entry per flush", ("batch",)),
    Variant("worker: uvloop", sim_loop="uvloop"),
    Variant("worker: coalesce window 10 ms", coalesce_ms=10.0),
    Variant("all of gc, batch, uvloop", ("gc", "batch"), sim_loop="uvloop"),
)


def measure(variant: Variant, streams: int, duration_s: float) -> dict[str, Any]:
    """One variant on a fresh stack."""
    config = capacity.CapacityConfig(
        levels=(streams,),
        duration_s=duration_s,
        coalesce_ms=variant.coalesce_ms,
        router_patches=variant.patches,
        sim_loop=variant.sim_loop,
    )
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-variant-"))
    work = log_dir / "work"
    work.mkdir()
    cap = capacity.start(config, log_dir)
    try:
        warm = capacity.CapacityConfig(levels=(10,), duration_s=2.0)
        capacity.run_level(cap, "router", 10, warm, work)
        row = capacity.run_level(cap, "router", streams, config, work)
    finally:
        cap.stop()
    row["variant"] = variant.name
    return row


def run(quick: bool, streams: int = 1000) -> dict[str, Any]:
    """Every variant, ``rounds`` times in alternating order."""
    rounds, duration = (1, 8.0) if quick else (2, 12.0)
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            logger.info("variant %r, round %d", variant.name, r + 1)
            try:
                row = measure(variant, streams, duration)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                logger.error("variant %r failed: %s", variant.name, exc)
                continue
            row["round"] = r
            rows.append(row)
    return {"streams": streams, "rounds": rounds, "duration_s": duration, "rows": rows}


def averaged(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant, in VARIANTS order: the mean of its rounds."""
    out = []
    for variant in VARIANTS:
        name = variant.name
        rows = [r for r in result.get("rows", []) if r["variant"] == name]
        if not rows:
            continue

        def mean(key: str, sub: str | None = None, rows: list[dict[str, Any]] = rows) -> float:
            values = [(r[key].get(sub, 0.0) if sub else r[key]) for r in rows]
            return float(sum(values) / len(values))

        out.append(
            {
                "variant": name,
                "rounds": len(rows),
                "steady_tokens_per_s": mean("steady_tokens_per_s"),
                "delay_p50_ms": mean("delay_p50_ms"),
                "delay_p99_ms": mean("delay_p99_ms"),
                "router_cpu_ms_per_1k": mean("cpu_ms_per_1k_tokens", "router"),
                "sim_cpu_ms_per_1k": mean("cpu_ms_per_1k_tokens", "sim0"),
                "redis_cpu_ms_per_1k": mean("cpu_ms_per_1k_tokens", "redis"),
                "errors": sum(r["errors"] for r in rows),
            }
        )
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(averaged(run(quick=True)), indent=1))


WORKER_TTFT_PATCHES = ("first-flush", "started-async")


def ttft_run(quick: bool) -> dict[str, Any]:
    """Our path with the product worker vs with the TTFT patches, on two real engines."""
    from bench import engine_path, stack
    from bench.procstats import watching

    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-ttft-"))
    work_a, work_b = log_dir / "a", log_dir / "b"
    work_a.mkdir()
    work_b.mkdir()
    requests, max_tokens = ({1: 8, 8: 16}, 16) if quick else ({1: 32, 8: 48}, 16)
    engine_path.wait_for_memory(engine_path.ENGINE_GIB * 2)
    base = stack.start_our_stack(log_dir)
    patched = stack.start_our_stack(log_dir, worker_patches=WORKER_TTFT_PATCHES)
    rows: list[dict[str, Any]] = []
    try:
        runners = {}
        for name, procs, work in (("product", base, work_a), ("patched", patched, work_b)):
            target = stack.target_of(procs["router"])
            stack.wait_grpc(target, procs["router"])
            runners[name] = (engine_path.ours_runner(target, work), procs)
            runners[name][0](engine_path.make_prompts(4, seed=998), 4, max_tokens, "warm")
        for r in range(1 if quick else 2):
            for c, n in sorted(requests.items()):
                prompts = engine_path.make_prompts(n, seed=100 * r + c)
                names = ("product", "patched") if (r + c) % 2 else ("patched", "product")
                for name in names:
                    run, procs = runners[name]
                    pids = {p: procs[p].popen.pid for p in ("router", "redis", "worker")}
                    with watching(pids) as watch:
                        document = run(prompts, c, max_tokens, f"ttft{r}")
                    row = engine_path.summarise(name, "ttft", c, document, watch.usage, 0.0)
                    rows.append({**row, "round": r})
    finally:
        for procs in (patched, base):
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {"patches": list(WORKER_TTFT_PATCHES), "max_tokens": max_tokens, "rows": rows}
