"""What a GPU run measures beside tokens/s: where the first token's time goes (the
router's and worker's metrics), py-spy profiles, and the load generator's own ceiling
(more client processes, and a bare grpc.aio server with no engine behind it)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from bench import profile as pyspy
from bench import stack
from bench.direct_engine import times_delta
from bench.engine_path import System, make_prompts
from bench.load_runners import ours_runner

logger = logging.getLogger("bench.gpu")

MAX_TOKENS = 256
PROFILE_S = 15.0


class Part(NamedTuple):
    """One latency histogram on a process's /metrics (series whose labels hold ``labels``)."""

    process: str
    metric: str
    labels: str = ""
    scale: float = 1000.0
    """Its mean's unit: 1000 for seconds shown in milliseconds, 1 for counts."""


LATENCY_PARTS = {
    "router_ttft": Part("router", "gen_ai_server_time_to_first_token_seconds"),
    "queue_wait": Part("worker", "qwen_serve_queue_wait_seconds"),
    "worker_ttft": Part("worker", "qwen_serve_engine_time_to_first_token_seconds"),
    "prepare": Part("worker", "qwen_serve_worker_start_stage_seconds", 'stage="prepare"'),
    "lease": Part("worker", "qwen_serve_worker_start_stage_seconds", 'stage="lease"'),
    "engine": Part("worker", "qwen_serve_worker_start_stage_seconds", 'stage="engine"'),
    "engine_queue": Part("worker", "vllm:request_queue_time_seconds"),
    "engine_prefill": Part("worker", "vllm:request_prefill_time_seconds"),
    "jobs_per_claim": Part("worker", "qwen_serve_worker_claim_batch_jobs", scale=1.0),
}
"""Where the first token's time goes: the router's view (arrival to first token), the
queue (router's enqueue to the worker's claim), the worker's (claim to first output) and
its stages (rendering, the lease, the engine; vLLM's own queue and prefill times of the
requests that finished), and how many jobs each claim brought."""


def latency_parts(ports: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each latency histogram, from the processes' /metrics."""
    import urllib.request

    pages = {
        process: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        .read()
        .decode()
        .splitlines()
        for process, port in ports.items()
        if process in {part.process for part in LATENCY_PARTS.values()}
    }
    parts = {}
    for name, part in LATENCY_PARTS.items():
        total = count = 0.0
        for line in pages[part.process]:
            if part.labels not in line:
                continue
            if line.startswith(f"{part.metric}_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(f"{part.metric}_count"):
                count += float(line.rsplit(" ", 1)[1])
        parts[name] = (total, count)
    return parts


def latency_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean of each latency part over one run, in milliseconds (jobs per claim: a count)."""
    return times_delta(before, after, {name: part.scale for name, part in LATENCY_PARTS.items()})


def profile(system: System, out: Path, c: int) -> dict[str, Any]:
    """py-spy on the router and the worker's serving process during one more run at ``c``."""
    recorders = {
        name: pyspy.record(system.pids[name], PROFILE_S, out / f"profile-{name}.txt")
        for name in ("router", "worker")
    }
    system.run(make_prompts(c * 2, 997), c, MAX_TOKENS, "profiled")
    summary: dict[str, Any] = {}
    for name, recorder in recorders.items():
        recorder.wait(timeout=120)
        path = out / f"profile-{name}.txt"
        if path.exists():
            summary[name] = pyspy.summarise_collapsed(path.read_text())
    return summary


BARE_RATE = 400.0
"""Steps per second of the bare server: at 256 streams it offers ~100,000 tokens/s, far more
than the engine gives, so what comes back is the load generator's own ceiling."""


def bare_ceiling(log_dir: Path, c: int, n: int) -> list[dict[str, Any]]:
    """The load generator against a bare grpc.aio server (no engine, router or Redis) at
    ``c`` streams, from 1 and 4 processes: the most tokens/s it can take in."""
    proc = stack.start_bare(log_dir, MAX_TOKENS, BARE_RATE)
    try:
        target = stack.target_of(proc)
        with grpc.insecure_channel(target) as channel:  # it has no health service
            grpc.channel_ready_future(channel).result(timeout=60)
        return _from_processes(target, (1, 4), c, n, c + 50, "bare ceiling")
    finally:
        proc.stop()


def client_check(system: System, c: int, n: int) -> list[dict[str, Any]]:
    """Our path at ``c`` from 1, 4 and 8 load-generator processes (the figures use c/64).

    If more client processes do not raise the tokens/s, the client was not the limit.
    """
    return _from_processes(system.target, (1, 4, 8), c, n, c, "client check")


def _from_processes(
    target: str, counts: tuple[int, ...], c: int, n: int, seed: int, label: str
) -> list[dict[str, Any]]:
    """Tokens/s of ``n`` requests at ``c`` streams to ``target`` from each number of client
    processes in ``counts`` (distinct prompts each run: seeded ``seed`` + the count)."""
    rows = []
    for procs in counts:
        runner = ours_runner(target, Path(tempfile.mkdtemp()), procs)
        report = runner(make_prompts(n, seed + procs), c, MAX_TOKENS, f"{label}{procs}")
        rows.append({"procs": procs, "tokens_per_s": report["streaming"]["tokensPerSecond"]})
        logger.info("%s: %d process(es): %.0f tok/s", label, procs, rows[-1]["tokens_per_s"])
    return rows
