"""A local stack of real processes (redis-server, worker, router) for the demo and tests.

``python -m qwen_serve_dev.devstack demo`` builds the tiny model, starts Redis
when ``REDIS_URL`` is unset, starts a worker and a router, streams a sample
chat and stops everything (``--keep`` keeps it serving until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

CACHE = Path(os.environ.get("QS_CACHE_DIR", Path.home() / ".cache" / "qwen-serve"))
TINY_MODEL_DIR = CACHE / "models" / "tiny-qwen3.5-moe"
WORKER_START_TIMEOUT_S = 300.0
KILL_WAIT_S = 60.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
                self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process (and its process group: the engine's children).

        Waits up to KILL_WAIT_S for it to be gone: tearing down a worker's
        multi-GiB engine processes has taken more than 10 s on a stalled 2-core host.
        """
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(KILL_WAIT_S)

    def tail(self, lines: int = 40) -> str:
        """The end of the log, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    args: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``args`` in its own process group, logging to ``log_dir/name.log``.

    ``python -m`` imports the project from ``cwd`` first: the benchmarks run
    another checkout's router and worker that way.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen, log_path, args)


def start_redis(
    log_dir: Path, port: int | None = None, *, aof: bool = False, extra: tuple[str, ...] = ()
) -> tuple[Proc, str]:
    """A throw-away redis-server on a free port.

    No persistence, or with ``aof`` the append-only file in ``log_dir`` (fsync every
    second, as the Kubernetes manifests run it): started again on the same port and
    directory, it comes back with its data. ``extra``: more command-line options.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    )
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence]
    proc = spawn(f"redis-{port}", [*args, "--dir", str(log_dir), *extra], log_dir)
    wait_port(port, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def wait_port(port: int, proc: Proc, timeout: float = 10) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not start:\n{proc.tail()}")


def python_module(module: str, *flags: str) -> list[str]:
    """Command line running ``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module, *flags]


def start_worker(
    redis_url: str,
    log_dir: Path,
    *flags: str,
    name: str = "worker",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    module: tuple[str, ...] = ("worker",),
) -> Proc:
    """A worker process on the tiny model (cpu-tiny profile unless flags say otherwise).

    ``redis_url`` goes into the environment (REDIS_URL), not on the command line,
    where a password would show in ``ps``. ``QS_DEVSTACK_WORKER_FLAGS`` adds flags to
    every worker started here, before ``flags`` (the GPU run of the end-to-end tests
    selects its profile with it). ``module``: the module to run and its first flags
    (benchmarks run prototypes).
    """
    devstack_flags = shlex.split(os.environ.get("QS_DEVSTACK_WORKER_FLAGS", ""))
    args = python_module(*module, "--model", str(TINY_MODEL_DIR), *devstack_flags, *flags)
    extra = {"QS_STATUS_FILE": str(log_dir / f"{name}-status.json"), "REDIS_URL": redis_url}
    return spawn(name, args, log_dir, {**extra, **(env or {})}, cwd)


def start_router(
    redis_url: str,
    port: int,
    log_dir: Path,
    *flags: str,
    name: str = "router",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """A router process listening on 127.0.0.1:``port`` (``env`` adds QS_* variables).

    ``redis_url`` goes into the environment (REDIS_URL), not on the command line.
    """
    args = python_module("router", "--listen", f"127.0.0.1:{port}")
    return spawn(name, [*args, *flags], log_dir, {"REDIS_URL": redis_url, **(env or {})}, cwd)


def health_status(
    target: str, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> int:
    """grpc.health.v1 status of ``service`` at ``target`` (TLS with ``credentials``).

    UNKNOWN when unreachable.
    """
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
        except grpc.RpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(reply.status)


def wait_serving(
    target: str,
    procs: list[Proc],
    timeout: float = WORKER_START_TIMEOUT_S,
    *,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Wait until ``service`` at ``target`` is SERVING; fail early if a process dies.

    ``service="liveness"`` waits for the process only (no worker needed).
    """
    deadline = time.monotonic() + timeout
    last_note = 0.0
    while time.monotonic() < deadline:
        if health_status(target, service, credentials) == health_pb2.HealthCheckResponse.SERVING:
            return
        for proc in procs:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        if time.monotonic() - last_note > 10:
            last_note = time.monotonic()
            logger.info("waiting for the stack to be ready (engine start takes ~30 s)")
        time.sleep(0.5)
    raise RuntimeError(f"stack not ready after {timeout:.0f} s:\n" + procs[-1].tail())


def build_tiny_model() -> Path:
    """Build (or reuse) the tiny Qwen3.5-MoE checkpoint."""
    from worker.tiny_model import build_tiny_model as build

    return build(TINY_MODEL_DIR)


@contextlib.contextmanager
def local_stack(log_dir: Path, redis_url: str | None = None) -> Iterator[tuple[str, list[Proc]]]:
    """Redis (if ``redis_url`` is None), a worker and a router; yields the router target."""
    procs: list[Proc] = []
    try:
        if redis_url is None:
            redis, redis_url = start_redis(log_dir)
            procs.append(redis)
            logger.info("started redis-server at %s", redis_url)
        port = free_port()
        procs.append(start_worker(redis_url, log_dir))
        procs.append(start_router(redis_url, port, log_dir))
        target = f"127.0.0.1:{port}"
        wait_serving(target, procs)
        yield target, procs
    finally:
        for proc in reversed(procs):
            proc.stop()


SAMPLE_CHAT = ("--max-tokens", "48", "--temperature", "0.7", "Write a haiku about gRPC streams.")
"""What the demo asks, through the client's command line (``qwen-serve chat``)."""


def demo(keep: bool) -> int:
    """Run the stack, stream a sample chat, stop (or keep serving)."""
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    logger.info("building the tiny model into %s", TINY_MODEL_DIR)
    build_tiny_model()
    log_dir = Path(tempfile.mkdtemp(prefix="qwen-serve-demo-"))
    logger.info("logs: %s", log_dir)
    with local_stack(log_dir, os.environ.get("REDIS_URL")) as (target, _procs):
        logger.info("router ready at %s; streaming a sample chat", target)
        from qwen_serve_client import cli

        code = cli.main(["chat", "--target", target, *SAMPLE_CHAT])
        if keep:
            logger.info("serving on %s until Ctrl-C (or SIGTERM)", target)
            signal.signal(signal.SIGTERM, _interrupt)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return code


def _interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM stops a kept demo as Ctrl-C does: the stack is stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m qwen_serve_dev.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("demo", help="run the stack and stream a sample chat")
    run.add_argument("--keep", action="store_true", help="keep serving after the sample chat")
    sub.add_parser("tiny-model", help="build the tiny model and print its path")
    args = parser.parse_args(argv)
    if args.command == "tiny-model":
        print(build_tiny_model())
        return
    sys.exit(demo(args.keep))


if __name__ == "__main__":
    main()
