"""Shared fixtures: one real stack (redis-server, worker with the CPU engine, router) per session.

The engine takes ~30 s to start, so the stack is started once; tests that
must kill or reconfigure something start their own extra processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import RouterQueue, WorkerQueue, connect
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import SharedSettings, new_id
from qwen_serve_dev import devstack
from tests.reliability import write_report
from tests.support.redis import redis_url

__all__ = ["redis_url"]  # the fixture, for every test module


@dataclass
class Stack:
    """A running stack."""

    target: str
    redis_url: str
    key_prefix: str
    log_dir: Path
    procs: list[devstack.Proc]

    def router(self, *flags: str, name: str) -> tuple[devstack.Proc, str]:
        """An extra router on the same Redis and prefix (caller stops it)."""
        port = devstack.free_port()
        proc = devstack.start_router(
            self.redis_url, port, self.log_dir, "--key-prefix", self.key_prefix, *flags, name=name
        )
        target = f"127.0.0.1:{port}"
        devstack.wait_serving(target, [proc], timeout=60)
        return proc, target


QueueTrio = tuple[RouterQueue, WorkerQueue, WorkerQueue]


@pytest.fixture
async def queues(redis_url: str) -> AsyncIterator[QueueTrio]:
    """A router's queue and two workers' ("worker-1", "worker-2", groups created) on
    the module's redis-server, under a fresh key prefix."""
    settings = SharedSettings(redis_url=redis_url, key_prefix=new_id("qs-queues"))
    keys = Keys(settings.key_prefix)
    router = RouterQueue(connect(settings, 1000), keys, "router-q", 5.0)
    workers = [WorkerQueue(connect(settings, 1000), keys, f"worker-{i}", 5.0) for i in (1, 2)]
    for worker in workers:
        await worker.ensure_group()
    try:
        yield router, workers[0], workers[1]
    finally:
        for queue in (router, *workers):
            await queue.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Qwen3.5-MoE checkpoint (built once, cached across runs)."""
    return devstack.build_tiny_model()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """redis-server on a free port, one worker and one router, as real processes."""
    log_dir = tmp_path_factory.mktemp("stack")
    redis, redis_url = devstack.start_redis(log_dir)
    prefix = "qs-test"
    port = devstack.free_port()
    procs = [redis]
    try:
        procs.append(devstack.start_worker(redis_url, log_dir, "--key-prefix", prefix))
        procs.append(devstack.start_router(redis_url, port, log_dir, "--key-prefix", prefix))
        target = f"127.0.0.1:{port}"
        devstack.wait_serving(target, procs)
        yield Stack(target, redis_url, prefix, log_dir, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture
async def stub(stack: Stack) -> AsyncIterator[serve_pb2_grpc.InferenceStub]:
    """An Inference stub on a fresh channel to the stack's router."""
    async with grpc.aio.insecure_channel(stack.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session", autouse=True)
def _reliability_report() -> Iterator[None]:
    """Write docs/reliability.md at the end if QS_RELIABILITY_REPORT names it."""
    yield
    write_report()
