"""Benchmark 1, the engine path: (a) our full path, (b) vLLM's gRPC server, (c) vLLM's
OpenAI server and (d) ``AsyncLLM`` in-process, on the same tiny model and engine settings.

An engine takes about 5 GiB here, so two run at a time: (a) stays up while (b), (c)
and (d) run beside it one after another; in each phase the two take turns at every
concurrency level, and each ratio compares (a) with the other system of its phase.
Every request is a distinct 32-token prompt (no prefix-cache hits) generating exactly
``max_tokens`` tokens greedily (``ignore_eos``). Clients run in their own processes;
CPU seconds are measured per server process tree with psutil.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import stack
from bench.load_runners import (
    Runner,
    direct_runner,
    openai_runner,
    ours_runner,
    read_marked,
    vllm_grpc_runner,
)
from bench.procstats import watching
from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc
from worker.profiles import ResolvedProfile

logger = logging.getLogger(__name__)

PROMPT_LEN = 32
VOCAB_LOW, VOCAB_HIGH = 100, 2900
DEFAULT_SMG_PYTHON = devstack.CACHE / "smg-venv" / "bin" / "python"
IDLE_SPIN_S = 2.0
"""Pause before each measured run. vLLM's CPU model runner busy-waits for 1 s after
its last step (``shm_broadcast``'s ``busy_loop_s``), and every engine here is bound
to core 0: without the pause the engine measured second shares its core with the
spin of the one measured first."""
SETTLE_S = 5.0
"""Quiet time after the warm-ups, so a server's start-up work ends before measuring."""
ENGINE_GIB = 5.5
"""Memory one cpu-tiny engine stack takes here (2 GiB KV cache + worker + EngineCore)."""


@dataclass(frozen=True)
class Workload:
    """Requests per concurrency level and tokens per request."""

    requests: dict[int, int]
    max_tokens: int
    warmup: int = 4

    @classmethod
    def of(cls, quick: bool) -> Workload:
        """The full or the --quick workload."""
        if quick:
            return cls({1: 4, 8: 16, 32: 32}, max_tokens=32, warmup=2)
        return cls({1: 32, 8: 64, 32: 192}, max_tokens=64)


def make_prompts(count: int, seed: int) -> list[list[int]]:
    """``count`` distinct random prompts of PROMPT_LEN token ids."""
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(PROMPT_LEN)] for _ in range(count)]


@dataclass
class System:
    """One of (a)-(d): how to run a load on it and which processes to measure."""

    key: str
    label: str
    pids: dict[str, int] = field(default_factory=dict)
    own_pids: dict[str, int] = field(default_factory=dict)
    """Processes measured without their children (a worker without its EngineCore)."""
    target: str = ""
    """Where its clients connect (gRPC host:port or an HTTP base URL)."""
    runner: Runner | None = None
    reason: str = ""
    wait: Callable[[], object] = lambda: None
    """Blocks until the system serves."""
    stop: Callable[[], object] = lambda: None

    def run(self, prompts: list[list[int]], concurrency: int, max_tokens: int, tag: str) -> Any:
        """Run the load and return (report, usage per process, wall seconds)."""
        assert self.runner is not None
        with watching(self.pids) as watch, watching(self.own_pids, descendants=False) as own:
            document = self.runner(prompts, concurrency, max_tokens, tag)
        return document, {**watch.usage, **own.usage}, watch.wall_s


def smg_problem(python: str) -> str:
    """Why vLLM's gRPC server cannot start with ``python``; empty when it can."""
    probe = "import smg_grpc_servicer.vllm.servicer, vllm.entrypoints.launchers.grpc_server"
    try:
        done = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=300, check=False
        )
    except OSError as exc:
        return f"{python}: {exc.strerror}"
    if done.returncode:
        return f"`{probe}` fails: {done.stderr.strip().splitlines()[-1]}"
    return ""


def summarise(
    system: str, phase: str, c: int, document: dict[str, Any], usage: Any, wall: float
) -> dict[str, Any]:
    """One row of results."""
    s = document["streaming"]
    tokens = s["outputTokens"]
    ttft, itl = s["timeToFirstToken"], s["interTokenLatency"]
    return {
        "system": system,
        "phase": phase,
        "concurrency": c,
        "load_avg_1m": os.getloadavg()[0],
        "requests": document["count"],
        "errors": sum(v for k, v in document["statusCodeDistribution"].items() if k != "OK"),
        "tokens": tokens,
        "tokens_per_s": s["tokensPerSecond"],
        "ttft_p50_ms": ttft.get("p50", 0) / 1e6,
        "ttft_p99_ms": ttft.get("p99", 0) / 1e6,
        "itl_p50_ms": itl.get("p50", 0) / 1e6,
        "itl_p99_ms": itl.get("p99", 0) / 1e6,
        "wall_s": wall,
        "cpu_s": {name: u.cpu_s for name, u in usage.items()},
        "cpu_s_per_1k_tokens": {
            name: (u.cpu_s * 1000 / tokens if tokens else 0.0) for name, u in usage.items()
        },
    }


class Launcher:
    """Starts each system on the shared engine settings; each returns before it is ready."""

    def __init__(
        self,
        log_dir: Path,
        smg_python: str,
        resolved: ResolvedProfile | None = None,
        worker_flags: tuple[str, ...] = (),
        router_flags: tuple[str, ...] = (),
        client_procs: int = 1,
        start_timeout_s: float = devstack.WORKER_START_TIMEOUT_S,
    ) -> None:
        self.log_dir = log_dir
        self.smg_python = smg_python
        self.resolved = resolved or stack.engine_profile()
        self.worker_flags = worker_flags
        self.router_flags = router_flags
        self.client_procs = client_procs
        """Load-generator processes per run; 0 scales them with concurrency."""
        self.start_timeout_s = start_timeout_s
        self.work = Path(tempfile.mkdtemp(prefix="qs-bench-", dir=log_dir))

    def ours(self) -> System:
        """(a) redis-server + worker + router."""
        procs = stack.start_our_stack(
            self.log_dir, self.router_flags, worker_flags=self.worker_flags
        )
        target = stack.target_of(procs["router"])
        system = System("a", "ours: router → Redis → worker → AsyncLLM", target=target)
        system.runner = ours_runner(target, self.work, self.client_procs)
        system.pids = {n: procs[n].popen.pid for n in ("router", "redis", "worker")}
        system.own_pids = {"worker-own": procs["worker"].popen.pid}
        system.wait = lambda: stack.wait_grpc(target, procs["router"], self.start_timeout_s)
        system.stop = functools.partial(_stop_all, list(procs.values()))
        return system

    def vllm_grpc(self) -> System:
        """(b) vLLM's gRPC server, or its reason for not running."""
        system = System("b", "vLLM gRPC server (smg-grpc-servicer)")
        system.reason = smg_problem(self.smg_python)
        if system.reason:
            return system
        proc = stack.start_vllm_grpc(self.log_dir, self.resolved, self.smg_python)
        system.runner = vllm_grpc_runner(stack.target_of(proc), self.work)
        system.pids = {"vllm-grpc": proc.popen.pid}
        system.wait = lambda: stack.wait_grpc(stack.target_of(proc), proc)
        system.stop = functools.partial(_stop_all, [proc])
        return system

    def vllm_openai(self) -> System:
        """(c) vLLM's OpenAI server."""
        proc = stack.start_vllm_openai(self.log_dir, self.resolved)
        model = self.resolved.served_model_name
        system = System("c", "vLLM OpenAI server")
        system.runner = openai_runner(stack.target_of(proc), model, self.work, self.client_procs)
        system.pids = {"vllm-openai": proc.popen.pid}
        system.own_pids = {"vllm-openai-own": proc.popen.pid}
        system.wait = lambda: stack.wait_http(stack.target_of(proc), proc, self.start_timeout_s)
        system.stop = functools.partial(_stop_all, [proc])
        return system

    def direct(self) -> System:
        """(d) AsyncLLM in a process of its own, driven over stdin."""
        log = (self.log_dir / "direct-engine.log").open("a")
        config = self.work / "direct-engine.json"
        engine = {"engine_args": dict(self.resolved.engine_args), "env": dict(self.resolved.env)}
        config.write_text(json.dumps(engine))
        proc = subprocess.Popen(
            devstack.python_module("bench.direct_engine", str(config)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**stack.bench_env(), **stack.engine_env(self.resolved)},
            start_new_session=True,
        )
        system = System("d", "AsyncLLM in-process (floor)", runner=direct_runner(proc))
        system.pids = {"direct": proc.pid}
        system.own_pids = {"direct-own": proc.pid}
        system.wait = functools.partial(read_marked, proc)
        system.stop = lambda: _stop_direct(proc)
        return system


def _stop_all(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        proc.stop()


def _stop_direct(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None and proc.stdin is not None:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_memory(gib: float, timeout_s: float = 600) -> None:
    """Wait until ``gib`` GiB are available (other engines on the machine may hold RAM)."""
    deadline = time.monotonic() + timeout_s
    while psutil.virtual_memory().available < gib * 2**30 and time.monotonic() < deadline:
        logger.info("waiting for %.0f GiB of free memory", gib)
        time.sleep(10)


def run_phase(ours: System, other: System, workload: Workload, rows: list[dict[str, Any]]) -> None:
    """(a) and one other system, taking turns at each concurrency level."""
    for level, (c, n) in enumerate(sorted(workload.requests.items())):
        prompts = make_prompts(n, seed=c)
        for s in (ours, other) if level % 2 == 0 else (other, ours):
            time.sleep(IDLE_SPIN_S)
            logger.info("(%s) concurrency %d, %d requests", s.key, c, n)
            document, usage, wall = s.run(prompts, c, workload.max_tokens, f"{other.key}{c}")
            rows.append(summarise(s.key, other.key, c, document, usage, wall))


def warm_up(system: System, workload: Workload) -> None:
    """A few requests so first-call costs stay out of the figures."""
    prompts = make_prompts(workload.warmup, seed=999)
    system.run(prompts, workload.warmup, workload.max_tokens, f"warm{system.key}")


def run(quick: bool, smg_python: str | None = None) -> dict[str, Any]:
    """Run benchmark 1: (a) stays up; (b), (c), (d) each run beside it in turn."""
    devstack.build_tiny_model()
    workload = Workload.of(quick)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-engine-"))
    logger.info("engine-path benchmark; logs in %s", log_dir)
    python = smg_python or str(
        DEFAULT_SMG_PYTHON if DEFAULT_SMG_PYTHON.exists() else sys.executable
    )
    launcher = Launcher(log_dir, python)
    rows: list[dict[str, Any]] = []
    systems: dict[str, dict[str, str]] = {}
    wait_for_memory(ENGINE_GIB * 2)
    ours = launcher.ours()
    try:
        for start_other in (launcher.vllm_grpc, launcher.vllm_openai, launcher.direct):
            wait_for_memory(ENGINE_GIB)
            other = start_other()
            systems[other.key] = {"label": other.label, "reason": other.reason}
            if other.runner is None:
                continue
            try:
                ours.wait()
                other.wait()
                for system in (other, ours):
                    warm_up(system, workload)
                time.sleep(SETTLE_S)
                run_phase(ours, other, workload, rows)
            finally:
                other.stop()
    finally:
        ours.stop()
    systems["a"] = {"label": ours.label, "reason": ""}
    return {
        "workload": {
            "requests": workload.requests,
            "max_tokens": workload.max_tokens,
            "prompt_tokens": PROMPT_LEN,
            "quick": quick,
        },
        "engine_args": stack.recorded_args(launcher.resolved),
        "engine_env": dict(launcher.resolved.env),
        "systems": systems,
        "rows": rows,
    }
