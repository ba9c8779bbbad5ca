"""Starting the processes the benchmarks compare, each on a free port.

Every engine gets the same settings: ``worker.profiles.resolve("cpu-tiny",
Overrides(model=tiny model dir))`` gives the ``AsyncEngineArgs`` keywords and the
environment (the KV cache size); :func:`engine_flags` spells them as vLLM CLI
flags for vLLM's own servers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc
from worker.profiles import Overrides, ResolvedProfile, resolve

logger = logging.getLogger(__name__)

PREFIX = "qs-bench"
SMG_WARMUP_ENV = "SMG_VLLM_SERVICER_WARMUP"


def engine_profile() -> ResolvedProfile:
    """The one engine configuration used by (a)-(d)."""
    return resolve("cpu-tiny", Overrides(model=str(devstack.TINY_MODEL_DIR)))


def recorded_args(resolved: ResolvedProfile) -> dict[str, Any]:
    """The engine arguments as a report records them: the home directory as ``~``.

    Reports land in docs/, which must not name one machine's paths.
    """
    args = dict(resolved.engine_args)
    args["model"] = home_as_tilde(str(args.get("model", "")))
    return args


def home_as_tilde(text: str) -> str:
    """``text`` with this machine's home directory written ``~`` (for reports in docs/)."""
    return text.replace(str(Path.home()) + os.sep, "~" + os.sep)


def engine_env(resolved: ResolvedProfile) -> dict[str, str]:
    """Environment for an engine process (KV cache size)."""
    return dict(resolved.env)


def engine_flags(args: Mapping[str, Any]) -> list[str]:
    """``AsyncEngineArgs`` keywords as vLLM command-line flags."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def start_our_stack(
    log_dir: Path,
    router_flags: tuple[str, ...] = (),
    code: Path | None = None,
    worker_flags: tuple[str, ...] = (),
    worker_module: tuple[str, ...] = ("worker",),
) -> dict[str, Proc]:
    """(a): redis-server, a worker (the cpu-tiny engine unless ``worker_flags`` say) and a router.

    ``code``: the checkout whose router and worker run (default: this one);
    ``python -m bench before-after`` passes an older commit's. ``worker_module``:
    the worker's module and its first flags (a bench prototype may stand in).
    """
    redis, url = devstack.start_redis(log_dir)
    procs = {"redis": redis}
    name = f"worker-{redis.popen.pid}"
    procs["worker"] = devstack.start_worker(
        url,
        log_dir,
        "--key-prefix",
        PREFIX,
        *worker_flags,
        name=name,
        cwd=code,
        module=worker_module,
    )
    port = devstack.free_port()
    procs["router"] = devstack.start_router(
        url, port, log_dir, "--key-prefix", PREFIX, *router_flags, name=f"router-{port}", cwd=code
    )
    procs["router"].args.append(f"127.0.0.1:{port}")
    return procs


def target_of(proc: Proc) -> str:
    """The address a started server listens on (kept as its last argument)."""
    return proc.args[-1]


def start_vllm_openai(log_dir: Path, resolved: ResolvedProfile) -> Proc:
    """(c): vLLM's OpenAI HTTP server (``python -m vllm.entrypoints.openai.api_server``)."""
    port = devstack.free_port()
    args = devstack.python_module(
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *engine_flags(resolved.engine_args),
    )
    proc = devstack.spawn("vllm-openai", args, log_dir, engine_env(resolved))
    proc.args.append(f"http://127.0.0.1:{port}")
    return proc


def start_vllm_grpc(log_dir: Path, resolved: ResolvedProfile, python: str) -> Proc:
    """(b): vLLM's gRPC server (``vllm.entrypoints.launchers.grpc_server``, smg-grpc-servicer).

    smg's planned warm-up is turned off: its second step, a one-token prefill,
    kills vLLM 0.32's CPU engine (see docs/benchmarks.md).
    """
    port = devstack.free_port()
    args = [
        python,
        "-m",
        "vllm.entrypoints.launchers.grpc_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *engine_flags(resolved.engine_args),
    ]
    env = {**engine_env(resolved), SMG_WARMUP_ENV: "off"}
    proc = devstack.spawn("vllm-grpc", args, log_dir, env)
    proc.args.append(f"127.0.0.1:{port}")
    return proc


def start_sim_worker(
    redis_url: str,
    log_dir: Path,
    tokens: int,
    rate: float,
    coalesce_ms: float,
    name: str,
    code: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Proc:
    """The SIMULATED engine (bench.sim_worker) on the bench key prefix (``extra``: more
    of its flags)."""
    args = devstack.python_module(
        "bench.sim_worker",
        *("--redis-url", redis_url, "--key-prefix", PREFIX),
        *("--tokens", str(tokens), "--rate", str(rate), "--coalesce-ms", str(coalesce_ms)),
        *extra,
    )
    return devstack.spawn(name, args, log_dir, cwd=code)


def start_router(
    redis_url: str, log_dir: Path, flags: tuple[str, ...], code: Path | None = None
) -> tuple[Proc, str]:
    """A router on the bench prefix, from the checkout ``code`` (default: this one)."""
    port = devstack.free_port()
    proc = devstack.start_router(redis_url, port, log_dir, "--key-prefix", PREFIX, *flags, cwd=code)
    return proc, f"127.0.0.1:{port}"


def start_bare(log_dir: Path, tokens: int, rate: float) -> Proc:
    """The bare grpc.aio ceiling server (bench.bare_server)."""
    port = devstack.free_port()
    args = devstack.python_module(
        "bench.bare_server", "--port", str(port), "--tokens", str(tokens), "--rate", str(rate)
    )
    proc = devstack.spawn("bare-server", args, log_dir)
    proc.args.append(f"127.0.0.1:{port}")
    return proc


def wait_grpc(target: str, proc: Proc, timeout: float = devstack.WORKER_START_TIMEOUT_S) -> None:
    """Wait until ``target`` reports SERVING on grpc.health.v1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if devstack.health_status(target) == health_pb2.HealthCheckResponse.SERVING:
            return
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        time.sleep(0.5)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s:\n{proc.tail()}")


def wait_port(target: str, proc: Proc, timeout: float = 60.0) -> None:
    """Wait until ``target`` (host:port) accepts TCP connections (servers without health)."""
    host, _, port = target.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.5):
            return
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not listening after {timeout:.0f} s:\n{proc.tail()}")


def wait_http(base_url: str, proc: Proc, timeout: float = devstack.WORKER_START_TIMEOUT_S) -> None:
    """Wait until ``base_url/health`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        time.sleep(0.5)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s:\n{proc.tail()}")


def bench_env() -> dict[str, str]:
    """Environment for client subprocesses (no proxies for loopback)."""
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


CLIENT_NICE = -10


def client_command(args: list[str]) -> list[str]:
    """A load generator's command line, raised in CPU priority (``nice -n -10``).

    On 2 cores a running engine keeps both busy (its processes busy-wait on each
    other between steps), and a client of normal priority then reads its stream in
    bursts, adding its own scheduling delay to every out-of-process system's time
    to first token; the in-process floor (d) has no such client. Without the right
    to raise priority, ``nice`` warns and runs the client unchanged.
    """
    return ["nice", "-n", str(CLIENT_NICE), *args]
