"""Before/after: an earlier commit's router and worker against this checkout's, side by side.

``python -m bench before-after --against REF`` checks ``REF`` out into a temporary
git worktree (with its gRPC stubs generated) and runs both versions in one run,
taking turns, so the machine's drift is shared:

1. router path at 1,000 streams on the simulated engine (each version's own router,
   ``ReplyWriter`` and ``bench.sim_worker``; from this change on the latter runs the
   version's own worker loop), each round on fresh stacks;
2. time to first token on the real CPU engine: two full stacks (Redis, worker,
   router) of the two versions up at once, the calls alternating between them.

Older commits run with their own code; only the load generator and the process
measurements are this checkout's.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import capacity, engine_path, load_runners, stack
from bench.procstats import watching

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
AFTER = "after (this checkout)"


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[tuple[Path, str]]:
    """A worktree of ``ref`` with generated stubs; yields (path, short commit id)."""
    commit = _git("rev-parse", "--short", f"{ref}^{{commit}}").strip()
    path = Path(tempfile.mkdtemp(prefix=f"qs-bench-{commit}-"))
    _git("worktree", "add", "--detach", "--force", str(path), commit)
    try:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "gen_protos"],
            cwd=path,
            check=True,
            capture_output=True,
        )
        yield path, commit
    finally:
        _git("worktree", "remove", "--force", str(path))


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return done.stdout


def run(ref: str, quick: bool, streams: int = 1000) -> dict[str, dict[str, Any]]:
    """Both comparisons; returns {"router": ..., "ttft": ...}."""
    with checkout(ref) as (tree, commit):
        before = f"before ({commit})"
        versions = {before: tree, AFTER: None}
        logger.info("before/after: %s in %s against this checkout", commit, tree)
        return {
            "router": router_run(versions, quick, streams),
            "ttft": ttft_run(versions, quick),
        }


def router_run(versions: dict[str, Path | None], quick: bool, streams: int) -> dict[str, Any]:
    """Each version's router path at ``streams`` streams, rounds in alternating order."""
    rounds, duration = (1, 8.0) if quick else (3, 12.0)
    rows: list[dict[str, Any]] = []
    names = list(versions)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            logger.info("%s, round %d: router path at %d streams", name, r + 1, streams)
            try:
                row = _router_level(versions[name], streams, duration)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                logger.error("%s failed: %s", name, exc)
                continue
            rows.append({**row, "variant": name, "round": r})
    return {"streams": streams, "rounds": rounds, "duration_s": duration, "rows": rows}


def _router_level(code: Path | None, streams: int, duration_s: float) -> dict[str, Any]:
    config = capacity.CapacityConfig(levels=(streams,), duration_s=duration_s, code=code)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-variant-"))
    work = log_dir / "work"
    work.mkdir()
    cap = capacity.start(config, log_dir)
    try:
        warm = capacity.CapacityConfig(levels=(10,), duration_s=2.0)
        capacity.run_level(cap, "router", 10, warm, work)
        return capacity.run_level(cap, "router", streams, config, work)
    finally:
        cap.stop()


def averaged(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per version, in the order first measured: the mean of its rounds."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in result.get("rows", [])):
        rows = [r for r in result["rows"] if r["variant"] == name]

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
                "rss_delta_mb": mean("rss_delta_mb", "router"),
                "errors": sum(r["errors"] for r in rows),
            }
        )
    return out


def ttft_run(versions: dict[str, Path | None], quick: bool) -> dict[str, Any]:
    """Both versions' full path on two real engines, calls alternating."""
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-ttft-"))
    requests, max_tokens = ({1: 8, 8: 16}, 16) if quick else ({1: 48, 8: 64}, 16)
    engine_path.wait_for_memory(engine_path.ENGINE_GIB * len(versions))
    stacks = {
        name: stack.start_our_stack(log_dir / str(i), code=code)
        for i, (name, code) in enumerate(versions.items())
    }
    rows: list[dict[str, Any]] = []
    try:
        runners = {}
        for i, (name, procs) in enumerate(stacks.items()):
            work = log_dir / f"work{i}"
            work.mkdir()
            target = stack.target_of(procs["router"])
            stack.wait_grpc(target, procs["router"])
            runners[name] = load_runners.ours_runner(target, work)
            runners[name](engine_path.make_prompts(4, seed=998), 4, max_tokens, "warm")
        names = list(stacks)
        for r in range(1 if quick else 2):
            for c, n in sorted(requests.items()):
                prompts = engine_path.make_prompts(n, seed=100 * r + c)
                for name in names if (r + c) % 2 else reversed(names):
                    time.sleep(engine_path.IDLE_SPIN_S)
                    procs = stacks[name]
                    pids = {p: procs[p].popen.pid for p in ("router", "redis", "worker")}
                    with watching(pids) as watch:
                        document = runners[name](prompts, c, max_tokens, f"ttft{r}")
                    row = engine_path.summarise(name, "ttft", c, document, watch.usage, 0.0)
                    rows.append({**row, "round": r})
    finally:
        for procs in stacks.values():
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {"max_tokens": max_tokens, "rows": rows}
