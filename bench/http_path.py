"""Benchmark 3, the HTTP door: the same engine through gRPC, through HTTP, and vLLM's own server.

Systems, side by side on the same tiny model and engine settings (two engines: ours
and vLLM's):

- (a) our gRPC API: ``Inference/Generate`` with token ids (``python -m loadtest``);
- (h) our HTTP API in the router process: ``/v1/completions`` with the same token ids
  (``bench.http_load``);
- (g) our HTTP API beside the router: the same routes in a process of their own that
  forwards to the router over gRPC (``bench.http_beside``, a prototype kept for this
  comparison);
- (c) vLLM's OpenAI server: ``/v1/completions``, the same client and bodies as (h).

At each concurrency level the four take turns (the order rotates); every level runs
``rounds`` times. Then one run of vLLM's own benchmarking client (``vllm bench serve
--backend openai-chat``) against (h) and against (c). Last, with the engines stopped,
the placement phase (``bench.http_placement``): (a), (h) and (g) on a simulated engine,
where the router, not the engine, is the bottleneck.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import engine_path, http_placement, load_runners, stack
from bench.engine_path import System, Workload
from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc

logger = logging.getLogger(__name__)

ORDER = ("a", "h", "g", "c")


@dataclass(frozen=True)
class HttpConfig:
    """The engine-path workload, rounds, and the vllm bench serve run."""

    workload: Workload
    rounds: int
    bench_prompts: int
    placement_levels: tuple[int, ...] = (100, 300)
    """Streams of the router-bound placement phase (simulated engine)."""
    bench_concurrency: int = 32
    input_len: int = 128
    output_len: int = 64

    @classmethod
    def of(cls, quick: bool) -> HttpConfig:
        """The full or the --quick configuration."""
        if quick:
            return cls(Workload.of(True), rounds=1, bench_prompts=32, placement_levels=(50,))
        return cls(Workload.of(False), rounds=2, bench_prompts=128)


@dataclass
class Ours:
    """Redis, worker and a router with its HTTP listener, plus the gateway beside it."""

    procs: dict[str, Proc]
    grpc_target: str
    http_url: str
    beside_url: str

    def stop(self) -> None:
        """Stop every process."""
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def start_ours(log_dir: Path, prefetch: int = 0) -> Ours:
    """(a), (h) and (g): one engine, three doors (``prefetch``: the prototype worker)."""
    http_port, beside_port = devstack.free_port(), devstack.free_port()
    flags = ("--http-listen", f"127.0.0.1:{http_port}")
    procs = stack.start_our_stack(log_dir, flags, worker_module=_worker_module(prefetch))
    target = stack.target_of(procs["router"])
    args = devstack.python_module(
        "bench.http_beside", "--router", target, "--listen", f"127.0.0.1:{beside_port}"
    )
    procs["beside"] = devstack.spawn("http-beside", args, log_dir)
    return Ours(procs, target, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{beside_port}")


def _worker_module(prefetch: int) -> tuple[str, ...]:
    return ("bench.prefetch_worker", "--prefetch", str(prefetch)) if prefetch else ("worker",)


def systems(ours: Ours, vllm: Proc, model: str, work: Path) -> dict[str, System]:
    """The four systems, with the processes whose CPU each one costs."""
    core = {n: ours.procs[n].popen.pid for n in ("router", "redis", "worker")}
    a = System("a", "ours, gRPC (Inference/Generate)", dict(core))
    a.runner = load_runners.ours_runner(ours.grpc_target, work)
    h = System("h", "ours, HTTP in the router (/v1/completions)", dict(core))
    h.runner = load_runners.openai_runner(ours.http_url, model, work)
    g = System("g", "ours, HTTP beside the router (prototype gateway)", dict(core))
    g.pids["beside"] = ours.procs["beside"].popen.pid
    g.runner = load_runners.openai_runner(ours.beside_url, model, work)
    c = System("c", "vLLM OpenAI server (/v1/completions)", {"vllm-openai": vllm.popen.pid})
    c.runner = load_runners.openai_runner(stack.target_of(vllm), model, work)
    return {s.key: s for s in (a, h, g, c)}


def run_levels(by_key: dict[str, System], config: HttpConfig) -> list[dict[str, Any]]:
    """Every level ``rounds`` times, the systems taking turns in a rotating order."""
    rows: list[dict[str, Any]] = []
    levels = sorted(config.workload.requests.items())
    for round_ in range(config.rounds):
        for level, (c, n) in enumerate(levels):
            prompts = engine_path.make_prompts(n, seed=c + 100 * round_)
            shift = (level + round_) % len(ORDER)
            for key in ORDER[shift:] + ORDER[:shift]:
                time.sleep(engine_path.IDLE_SPIN_S)
                logger.info("(%s) round %d, concurrency %d, %d requests", key, round_, c, n)
                s = by_key[key]
                document, usage, wall = s.run(prompts, c, config.workload.max_tokens, f"r{round_}")
                row = engine_path.summarise(key, "http", c, document, usage, wall)
                rows.append({**row, "round": round_})
    return rows


def vllm_bench_serve(
    base_url: str, label: str, model: str, config: HttpConfig, out_dir: Path
) -> dict[str, Any]:
    """One run of ``vllm bench serve --backend openai-chat``; its saved result and command."""
    args = [
        *("--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions"),
        *("--model", model, "--tokenizer", str(devstack.TINY_MODEL_DIR)),
        *("--dataset-name", "random", "--random-input-len", str(config.input_len)),
        *("--random-output-len", str(config.output_len), "--ignore-eos"),
        *("--num-prompts", str(config.bench_prompts)),
        *("--max-concurrency", str(config.bench_concurrency), "--temperature", "0"),
        *("--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"),
        *("--save-result", "--result-dir", str(out_dir), "--result-filename", f"{label}.json"),
        *("--label", label, "--disable-tqdm", "--seed", "7"),
    ]
    command = devstack.python_module("bench.vllm_bench_serve", *args)
    log = out_dir / f"{label}.log"
    with log.open("w") as out:
        subprocess.run(
            stack.client_command(command), check=True, env=stack.bench_env(), stdout=out, stderr=out
        )
    result = json.loads((out_dir / f"{label}.json").read_text())
    keep = ("completed", "failed", "duration", "total_output_tokens", "output_throughput")
    summary = {k: result.get(k) for k in keep}
    summary.update({k: v for k, v in result.items() if k.startswith(("median_", "p99_"))})
    shown = ["vllm bench serve", *args[: args.index("--save-result")]]
    return {"label": label, "command": stack.home_as_tilde(" ".join(shown)), "result": summary}


def run(quick: bool, prefetch: int = 0, rounds: int | None = None) -> dict[str, Any]:
    """Run benchmark 3 (``prefetch``: with the prototype worker, engine phase only)."""
    devstack.build_tiny_model()
    config = HttpConfig.of(quick)
    if rounds is not None:
        config = dataclasses.replace(config, rounds=rounds)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-http-"))
    work = Path(tempfile.mkdtemp(prefix="qs-bench-", dir=log_dir))
    logger.info("HTTP-door benchmark; logs in %s", log_dir)
    resolved = stack.engine_profile()
    model = resolved.served_model_name
    engine_path.wait_for_memory(engine_path.ENGINE_GIB * 2)
    ours = start_ours(log_dir, prefetch)
    vllm = stack.start_vllm_openai(log_dir, resolved)
    try:
        by_key = systems(ours, vllm, model, work)
        stack.wait_grpc(ours.grpc_target, ours.procs["router"])
        stack.wait_http(ours.http_url, ours.procs["router"])
        stack.wait_http(stack.target_of(vllm), vllm)
        for s in by_key.values():
            engine_path.warm_up(s, config.workload)
        time.sleep(engine_path.SETTLE_S)
        rows = run_levels(by_key, config)
        runs = [
            vllm_bench_serve(url, label, model, config, work)
            for url, label in ((ours.http_url, "ours-http"), (stack.target_of(vllm), "vllm-openai"))
        ]
    finally:
        vllm.stop()
        ours.stop()
    labels = {k: s.label for k, s in by_key.items()}
    result = _result(config, labels, rows, runs, stack.recorded_args(resolved))
    if prefetch:
        return {**result, "prefetch": prefetch}
    placement = http_placement.run(config.placement_levels, log_dir, work)
    return {**result, "placement": placement}


def _result(
    config: HttpConfig,
    labels: dict[str, str],
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    engine_args: dict[str, Any],
) -> dict[str, Any]:
    workload = config.workload
    return {
        "workload": {
            "requests": workload.requests,
            "max_tokens": workload.max_tokens,
            "prompt_tokens": engine_path.PROMPT_LEN,
            "rounds": config.rounds,
        },
        "engine_args": engine_args,
        "systems": labels,
        "rows": rows,
        "vllm_bench_serve": runs,
    }
