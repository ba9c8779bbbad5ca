"""Where the HTTP listener runs, with the router as the bottleneck (SIMULATED engine).

The engine path (``bench.http_path``) is bound by the CPU engine, so it cannot show
what the HTTP door itself costs. Here ``bench.sim_worker`` (a simulated engine, not
the product) streams 64 tokens per request at 20 tokens/s, and the same clients load
(a) the router's gRPC API, (h) its in-process HTTP listener and (g) the prototype
gateway beside it (``bench.http_beside``), taking turns at each level. The figure
that decides is the servers' CPU per 1,000 delivered tokens.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import capacity, engine_path, stack
from bench.http_load import completion_body
from bench.procstats import watching
from bench.sim_worker import SIM_MODEL
from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc

logger = logging.getLogger(__name__)

TOKENS, RATE = 64, 20.0
PROMPT = [100 + i for i in range(16)]


def _start(log_dir: Path) -> tuple[dict[str, Proc], dict[str, str]]:
    redis, url = devstack.start_redis(log_dir)
    procs = {"redis": redis}
    procs["sim"] = stack.start_sim_worker(url, log_dir, TOKENS, RATE, 2.0, name="sim-worker")
    http_port, beside_port = devstack.free_port(), devstack.free_port()
    flags = (*capacity.ROUTER_FLAGS, "--http-listen", f"127.0.0.1:{http_port}")
    procs["router"], target = stack.start_router(url, log_dir, flags)
    stack.wait_grpc(target, procs["router"], timeout=60)
    args = devstack.python_module(
        "bench.http_beside", "--router", target, "--listen", f"127.0.0.1:{beside_port}"
    )
    procs["beside"] = devstack.spawn("http-beside-sim", args, log_dir)
    urls = {
        "a": target,
        "h": f"http://127.0.0.1:{http_port}",
        "g": f"http://127.0.0.1:{beside_port}",
    }
    stack.wait_http(urls["g"], procs["beside"], timeout=60)
    return procs, urls


def _client(key: str, url: str, streams: int, work: Path) -> list[str]:
    """The load generator's command line: loadtest for gRPC, bench.http_load for HTTP."""
    total, out = streams * 2, work / f"{key}-{streams}.json"
    if key == "a":
        data = work / "grpc.json"
        body = {"tokenIds": {"ids": PROMPT}, "sampling": {"maxTokens": TOKENS}}
        data.write_text(json.dumps([body]))
        call = "qwen_serve.api.v1.Inference/Generate"
        args = devstack.python_module("loadtest", "--insecure", "--call", call, "-D", str(data))
        args += ["-c", str(streams), "-n", str(total), "--connections", str(max(1, streams // 100))]
        return [*args, "-t", "300s", "-O", "json", "-o", str(out), "--no-progress", url]
    data = work / "http.json"
    data.write_text(json.dumps([completion_body(SIM_MODEL, PROMPT, TOKENS)]))
    args = devstack.python_module("bench.http_load", "--url", url, "-D", str(data))
    return [*args, "-c", str(streams), "-n", str(total), "-o", str(out)]


def _level(key: str, url: str, streams: int, procs: dict[str, Proc], work: Path) -> dict[str, Any]:
    pids = {n: procs[n].popen.pid for n in ("router", "redis", "sim")}
    if key == "g":
        pids["beside"] = procs["beside"].popen.pid
    client = subprocess.Popen(
        stack.client_command(_client(key, url, streams, work)), env=stack.bench_env()
    )
    with watching({**pids, "client": client.pid}) as watch:
        client.wait()
    if client.returncode:
        raise RuntimeError(f"load generator failed: ({key}) at {streams} streams")
    document = json.loads((work / f"{key}-{streams}.json").read_text())
    return engine_path.summarise(key, "sim", streams, document, watch.usage, watch.wall_s)


def run(levels: tuple[int, ...], log_dir: Path, work: Path) -> list[dict[str, Any]]:
    """Every level, the three doors taking turns (rotating order)."""
    procs, urls = _start(log_dir)
    rows: list[dict[str, Any]] = []
    try:
        order = ("a", "h", "g")
        for i, streams in enumerate(levels):
            for key in order[i % 3 :] + order[: i % 3]:
                time.sleep(1.0)
                logger.info("(%s) simulated engine, %d streams", key, streams)
                rows.append(_level(key, urls[key], streams, procs, work))
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop(10)
    return rows
