"""Benchmark 2, router capacity: client → router → Redis → SIMULATED engine, 1 to 1,000+ streams.

``bench.sim_worker`` (a simulated engine, not the product) streams ``tokens`` tokens
per stream at ``rate`` tokens/s through the product's worker loop (claims, leases,
heartbeats, reply writer); the router and Redis are the real ones. The ceiling is
``bench.bare_server``, a bare grpc.aio server stepping the same tokens to the same
client. At each level the two take turns with the same ``python -m loadtest
--stamped-tokens`` client, which measures delivered tokens/s and each token's delay
from emit to receipt.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stack
from bench.procstats import Usage, tree_rss, watching
from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc

logger = logging.getLogger(__name__)

CHAT = {
    "messages": [{"role": "ROLE_USER", "content": [{"text": "simulated"}]}],
    "sampling": {"maxTokens": 64},
}
ROUTER_FLAGS = (
    *("--max-inflight", "100000", "--max-inflight-per-tenant", "100000"),
    *("--max-queue-depth", "1000000"),
)


@dataclass(frozen=True)
class CapacityConfig:
    """Levels and the simulated stream shape."""

    levels: tuple[int, ...]
    tokens: int = 64
    rate: float = 20.0
    duration_s: float = 15.0
    """Each client worker streams back-to-back for this long (``-z``)."""
    coalesce_ms: float = 2.0
    sim_workers: int = 1
    code: Path | None = None
    """Checkout whose router and simulated worker run (None: this one)."""

    @classmethod
    def of(cls, quick: bool) -> CapacityConfig:
        """The full or the --quick configuration."""
        if quick:
            return cls(levels=(1, 100, 1000), duration_s=8.0)
        return cls(levels=(1, 10, 100, 250, 500, 1000, 1500))


@dataclass
class CapacityStack:
    """Redis, router, simulated worker(s) and the bare ceiling server."""

    procs: dict[str, Proc]
    router_target: str
    bare_target: str

    def stop(self) -> None:
        """Stop every process."""
        for proc in reversed(list(self.procs.values())):
            proc.stop(10)


def start(config: CapacityConfig, log_dir: Path) -> CapacityStack:
    """Start Redis, the router, the simulated worker(s) and the bare server."""
    redis, url = devstack.start_redis(log_dir)
    procs = {"redis": redis}
    for i in range(config.sim_workers):
        procs[f"sim{i}"] = stack.start_sim_worker(
            url,
            log_dir,
            config.tokens,
            config.rate,
            config.coalesce_ms,
            name=f"sim-worker-{i}",
            code=config.code,
        )
    procs["router"], router_target = stack.start_router(url, log_dir, ROUTER_FLAGS, config.code)
    procs["bare"] = stack.start_bare(log_dir, config.tokens, config.rate)
    stack.wait_grpc(router_target, procs["router"], timeout=60)
    bare = stack.target_of(procs["bare"])
    return CapacityStack(procs, router_target, bare)


def client_args(target: str, streams: int, duration_s: float, out: Path, data: Path) -> list[str]:
    """The loadgen command line for one level."""
    connections = max(1, min(16, math.ceil(streams / 100)))
    return devstack.python_module(
        "loadtest",
        *("--insecure", "--call", "qwen_serve.api.v1.Inference/Chat", "-D", str(data)),
        *("-c", str(streams), "-z", f"{duration_s}s", "--connections", str(connections)),
        *("-t", "300s", "-O", "json", "-o", str(out), "--no-progress", "--stamped-tokens"),
        target,
    )


def run_level(
    cap: CapacityStack, path: str, streams: int, config: CapacityConfig, work: Path
) -> dict[str, Any]:
    """One load at ``streams`` concurrent streams on the router (``path="router"``) or bare."""
    target = cap.router_target if path == "router" else cap.bare_target
    data, out = work / "chat.json", work / f"{path}-{streams}.json"
    data.write_text(json.dumps(CHAT))
    pids = (
        {"bare": cap.procs["bare"].popen.pid}
        if path == "bare"
        else {name: p.popen.pid for name, p in cap.procs.items() if name != "bare"}
    )
    args = client_args(target, streams, config.duration_s, out, data)
    client = subprocess.Popen(stack.client_command(args), env=stack.bench_env())
    with watching({**pids, "client": client.pid}) as watch:
        client.wait()
    if client.returncode:
        raise RuntimeError(f"loadgen failed at {streams} streams on {path}")
    document = json.loads(out.read_text())
    return summarise(path, streams, config.rate, document, watch.usage, watch.wall_s)


def summarise(
    path: str,
    streams: int,
    rate: float,
    document: dict[str, Any],
    usage: dict[str, Usage],
    wall: float,
) -> dict[str, Any]:
    """One row of results."""
    s = document["streaming"]
    delay = s.get("deliveryDelay", {})
    tokens = s["outputTokens"]
    run_s = max(document["total"] / 1e9, 1e-9)
    return {
        "path": path,
        "streams": streams,
        "calls": document["count"],
        "errors": sum(v for k, v in document["statusCodeDistribution"].items() if k != "OK"),
        "tokens": tokens,
        "tokens_per_s": s["tokensPerSecond"],
        "steady_tokens_per_s": s.get("steadyTokensPerSecond", 0.0),
        "offered_tokens_per_s": streams * rate,
        "delay_p50_ms": delay.get("p50", 0) / 1e6,
        "delay_p99_ms": delay.get("p99", 0) / 1e6,
        "ttft_p50_ms": s["timeToFirstToken"].get("p50", 0) / 1e6,
        "wall_s": wall,
        "cpu_s": {n: u.cpu_s for n, u in usage.items()},
        "cpu_cores": {n: u.cpu_s / run_s for n, u in usage.items()},
        "cpu_ms_per_1k_tokens": {n: u.cpu_s * 1e6 / tokens for n, u in usage.items()}
        if tokens
        else {},
        "rss_mb": {n: u.rss_peak / 2**20 for n, u in usage.items()},
        "rss_delta_mb": {n: u.rss_delta / 2**20 for n, u in usage.items()},
    }


def run(quick: bool, config: CapacityConfig | None = None) -> dict[str, Any]:
    """Run benchmark 2 and return its results."""
    config = config or CapacityConfig.of(quick)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-capacity-"))
    work = log_dir / "work"
    work.mkdir()
    logger.info("router-capacity benchmark; logs in %s", log_dir)
    cap = start(config, log_dir)
    rows: list[dict[str, Any]] = []
    try:
        for path in ("bare", "router"):
            run_level(cap, path, 10, config, work)  # warm-up
        idle = {n: tree_rss(p.popen.pid) / 2**20 for n, p in cap.procs.items()}
        for i, streams in enumerate(config.levels):
            for path in ("bare", "router") if i % 2 == 0 else ("router", "bare"):
                logger.info("%s: %d streams", path, streams)
                rows.append(run_level(cap, path, streams, config, work))
    finally:
        cap.stop()
    return {
        "config": {
            "levels": list(config.levels),
            "tokens": config.tokens,
            "rate": config.rate,
            "duration_s": config.duration_s,
            "coalesce_ms": config.coalesce_ms,
            "sim_workers": config.sim_workers,
            "quick": quick,
        },
        "idle_rss_mb": idle,
        "rows": rows,
    }
