"""What the fault-injection tests share: the fault stack, clients, outcome counting.

The fault stack is one redis-server (append-only file on, as the Kubernetes
manifests run it), two workers with the CPU engine and a router, all real
processes, started once per session (``faults`` in conftest.py) because the
tests kill, freeze and restart them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import RouterQueue, connect
from qwen_serve.queue.codec import Job, Reply, decode_lease, encode
from qwen_serve.queue.keys import WORKER_GROUP, Keys
from qwen_serve.settings import SharedSettings
from qwen_serve_dev import devstack
from router.jobs import make_job
from tests.reliability import Outcome
from tests.support.calls import chat

PREFIX = "qs-faults"
HEARTBEAT_TTL_S = 10.0
"""Twice the default: this 2-core machine runs two CPU engines, often a third starting,
a router and the tests, and stalled processes for seconds at a time (a sleeping process
woke up to 3.6 s late, ``python -m qwen_serve_dev.stallmon``); a 5 s TTL there declared
live workers and routers gone. ``renice_engines`` removed the main cause; the margin
stays for a worker that is starting its engine beside two running ones."""
STACK_FLAGS = ("--key-prefix", PREFIX, "--heartbeat-ttl-s", f"{HEARTBEAT_TTL_S:g}")
"""Flags of every router and worker of the fault stack."""
Stub = serve_pb2_grpc.InferenceStub


@dataclass
class FaultStack:
    """Processes of the fault stack, restartable by the tests."""

    log_dir: Path
    redis_port: int
    redis: devstack.Proc
    workers: list[devstack.Proc]
    router: devstack.Proc
    router_port: int
    extra: list[devstack.Proc] = field(default_factory=list)
    warmed: set[str] = field(default_factory=set)
    """Worker ids that served a warm-up burst (``await_workers``)."""

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def all(self) -> list[devstack.Proc]:
        return [self.router, *self.workers, *self.extra, self.redis]

    def settings(self) -> SharedSettings:
        return SharedSettings(
            redis_url=self.redis_url, key_prefix=PREFIX, heartbeat_ttl_s=HEARTBEAT_TTL_S
        )

    def queue(self, router_id: str = "probe") -> RouterQueue:
        """A RouterQueue on the stack's Redis (the caller closes it)."""
        # A patient reader (12 s): a loaded host may stall Redis for seconds, and a probe
        # timing out would fail a test that the system itself rides out.
        return RouterQueue(
            connect(self.settings(), 10_000), Keys(PREFIX), router_id, HEARTBEAT_TTL_S
        )

    def restart_redis(self) -> None:
        """SIGKILL redis-server and start it again on its port and append-only file."""
        self.redis.kill()
        self.redis, _ = devstack.start_redis(self.log_dir, self.redis_port, aof=True)


DRAIN_GRACE_S = 3


def start_worker(log_dir: Path, redis_url: str, name: str) -> devstack.Proc:
    flags = (*STACK_FLAGS, "--drain-grace-s", str(DRAIN_GRACE_S))
    return devstack.start_worker(redis_url, log_dir, *flags, name=name)


def start_router(log_dir: Path, redis_url: str, port: int, name: str) -> devstack.Proc:
    flags = (*STACK_FLAGS, "--max-inflight-per-tenant", "1024")
    return devstack.start_router(redis_url, port, log_dir, *flags, name=name)


@contextlib.contextmanager
def fault_stack(log_dir: Path) -> Iterator[FaultStack]:
    """Start the fault stack; stop whatever is left of it at the end."""
    port = devstack.free_port()
    redis, url = devstack.start_redis(log_dir, port, aof=True)
    workers = [start_worker(log_dir, url, f"worker-{i}") for i in range(2)]
    router_port = devstack.free_port()
    router = start_router(log_dir, url, router_port, "router")
    stack = FaultStack(log_dir, port, redis, workers, router, router_port)
    try:
        devstack.wait_serving(stack.target, stack.all())
        asyncio.run(await_workers(stack, 2))
        yield stack
    finally:
        for proc in stack.all():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGCONT)  # a test that failed mid-freeze
            proc.stop(timeout=20)


async def live_worker_ids(stack: FaultStack) -> set[str]:
    queue = stack.queue()
    try:
        return {w.worker_id for w in await queue.live_workers()}
    finally:
        await queue.close()


async def await_workers(stack: FaultStack, count: int, timeout: float = 300) -> None:
    """Wait for ``count`` live workers; a worker not seen before is warmed first.

    A worker's first requests pay one-time costs (the CPU engine's first steps at new
    batch sizes): on a 2-core machine shared by two engines that can starve its event
    loop past the heartbeat TTL, or hold back its first token while the other worker
    finishes whole streams, so a test would find its streams moved or finished before
    its fault. Bursts through the router run those costs first (``_warm``).
    """
    died = _replace_dead_workers(stack)
    live = await _live_at_least(stack, count, timeout)
    renice_engines(stack)
    if live - stack.warmed:
        await _warm(stack, live)
        live = await _live_at_least(stack, count, timeout)
    stack.warmed |= live
    assert not died, "a worker of the fault stack died (replaced):\n" + "\n".join(died)


ENGINE_NICE = 10


def renice_engines(stack: FaultStack) -> None:
    """Give the stack's engine processes (every thread of every process a worker started:
    vLLM's engine core and model runner) a lower CPU priority than the serving processes.

    On this 2-core host the engines busy-wait (both model runners are pinned to core 0,
    the engine cores poll shared memory), and the workers' own event loops went without
    CPU for 10-20 s at a time, so live workers missed heartbeats; on a serving host each
    engine has its own accelerator and the serving loop its CPU. Threads started later
    inherit the priority of the thread that starts them.
    """
    for proc in stack.workers:
        try:
            children = psutil.Process(proc.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                for thread in child.threads():
                    os.setpriority(os.PRIO_PROCESS, thread.id, ENGINE_NICE)


def _replace_dead_workers(stack: FaultStack) -> list[str]:
    """Start a new worker for each one that exited on its own; the tails of their logs.

    A crash is a failure of the test that finds it, not of every test after it.
    """
    dead = [w for w in stack.workers if not w.alive]
    for proc in dead:
        stack.workers.remove(proc)
        stack.workers.append(start_worker(stack.log_dir, stack.redis_url, f"{proc.name}-again"))
    return [f"{proc.name}:\n{proc.tail()}" for proc in dead]


WORKER_CAPACITY = 8
"""Jobs one fault-stack worker runs at once (the cpu-tiny profile's max_num_seqs)."""


async def _warm(stack: FaultStack, live: set[str], rounds: int = 3) -> None:
    """Bursts of short generations, a full load for every live worker, until each new one
    ran some (the leases say who ran what): one worker claims at most its capacity."""
    cold = live - stack.warmed
    async with grpc.aio.insecure_channel(stack.target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(rounds):
            burst = [run_stream(stub, _warm_up(i)) for i in range(WORKER_CAPACITY * len(live))]
            ends = await asyncio.gather(*burst)
            assert all(s.complete for s in ends), [s for s in ends if not s.complete]
            cold -= set(await lease_holders(stack, [s.request_id for s in ends]))
            if not cold:
                return
    raise AssertionError(f"workers {sorted(cold)} took no warm-up request")


def _warm_up(i: int) -> pb.GenerateRequest:
    """A short HIGH generation: HIGH jobs are not placed, so every worker claims some."""
    request = raw_generate(i, 32)
    request.priority = pb.PRIORITY_HIGH
    return request


async def _live_at_least(stack: FaultStack, count: int, timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while len(live := await live_worker_ids(stack)) < count:
        assert time.monotonic() < deadline, "workers did not come up"
        await asyncio.sleep(1)
    return live


def worker_id(proc: devstack.Proc) -> str:
    """The id a worker process logged at start."""
    found = re.search(r"starting worker (\S+)", proc.log_path.read_text())
    assert found, proc.tail()
    return found.group(1)


async def lease_holders(stack: FaultStack, request_ids: list[str], attempt: int = 0) -> list[str]:
    """The worker holding each request's lease for an attempt ("" if none, or fenced)."""
    queue = stack.queue()
    try:
        raws: list[Any] = await queue.redis.mget(
            [Keys(PREFIX).lease(r, attempt) for r in request_ids]
        )
    finally:
        await queue.close()
    return [decode_lease(raw).worker_id if raw else "" for raw in raws]


async def busiest_worker(stack: FaultStack, streams: list[Stream]) -> devstack.Proc:
    """The worker process running the most of these (started) streams, by their leases.

    Heartbeats would do too, but a second late: right after a warm-up they still count
    requests that have ended.
    """
    running = [s for s in streams if s.request_id and not s.ended_at]
    holders = Counter(h for h in await lease_holders(stack, [s.request_id for s in running]) if h)
    assert holders, f"no running stream holds a lease: {streams}"
    busiest = holders.most_common(1)[0][0]
    return next(w for w in stack.workers if worker_id(w) == busiest)


def freeze(proc: devstack.Proc) -> None:
    """SIGSTOP the process and its engine's processes (a VM pause, a long GC, a stall)."""
    os.killpg(proc.popen.pid, signal.SIGSTOP)


def thaw(proc: devstack.Proc) -> None:
    """SIGCONT what freeze() stopped."""
    os.killpg(proc.popen.pid, signal.SIGCONT)


# ------------------------------------------------------------------ clients


@dataclass
class Stream:
    """What one client saw."""

    token_ids: list[int] = field(default_factory=list)
    content: str = ""
    started: int = 0
    request_id: str = ""
    finished: list[pb.Finished] = field(default_factory=list)
    usage: pb.Usage | None = None
    error: pb.Error | None = None
    status: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float = 0.0

    @property
    def complete(self) -> bool:
        return self.usage is not None and self.error is None and self.status is None

    @property
    def aborted(self) -> bool:
        reasons = {f.reason for f in self.finished}
        return self.usage is not None and reasons == {pb.FINISH_REASON_ABORT}

    @property
    def clear_failure(self) -> bool:
        retryable = self.error is not None and self.error.retryable
        return retryable or self.status in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


async def run_stream(
    stub: Stub,
    request: pb.ChatRequest | pb.GenerateRequest,
    progress: asyncio.Event | None = None,
    timeout: float = 300,
    after_tokens: int = 8,
    out: Stream | None = None,
) -> Stream:
    """Run one call to its end; ``progress`` is set once ``after_tokens`` arrived.

    ``out`` (filled as events arrive) lets the caller watch the stream meanwhile.
    """
    out = out if out is not None else Stream()
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    try:
        async for event in call(request, timeout=timeout):  # type: ignore[operator]
            kind = event.WhichOneof("event")
            if kind == "started":
                out.started += 1
                out.request_id = event.started.request_id
            elif kind == "delta":
                out.token_ids.extend(event.delta.token_ids)
                out.content += event.delta.content
                if progress is not None and len(out.token_ids) >= after_tokens:
                    progress.set()
            elif kind == "finished":
                out.finished.append(event.finished)
            elif kind == "usage":
                out.usage = event.usage
            elif kind == "error":
                out.error = event.error
    except grpc.aio.AioRpcError as exc:
        out.status, out.details = exc.code(), exc.details() or ""
    out.ended_at = time.monotonic()
    return out


RETRYABLE_BEFORE_START = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


async def start_streams(
    stub: Stub, count: int, tokens: int, timeout: float = 300
) -> tuple[list[asyncio.Task[Stream]], list[Stream]]:
    """``count`` greedy raw streams, returned once every one has tokens.

    A stream refused with a retryable status before its first token is sent again, as
    a client would (at most 3 times); any other end before tokens fails at once, named.
    """
    outs = [Stream() for _ in range(count)]
    ready = [asyncio.Event() for _ in range(count)]
    tries = [1] * count

    def launch(i: int) -> asyncio.Task[Stream]:
        outs[i], ready[i] = Stream(), asyncio.Event()
        return asyncio.create_task(run_stream(stub, raw_generate(i, tokens), ready[i], out=outs[i]))

    tasks = [launch(i) for i in range(count)]
    deadline = time.monotonic() + timeout
    while not all(event.is_set() for event in ready):
        for i, task in enumerate(tasks):
            if not task.done() or ready[i].is_set():
                continue
            ended = outs[i]
            assert ended.status in RETRYABLE_BEFORE_START and tries[i] < 3, (
                f"stream {i} ended before its first tokens (try {tries[i]}): {ended}"
            )
            tries[i] += 1
            tasks[i] = launch(i)
        assert time.monotonic() < deadline, f"streams without tokens after {timeout:g} s: {outs}"
        await asyncio.sleep(0.1)
    return tasks, outs


def long_chat(i: int, tokens: int = 120) -> pb.ChatRequest:
    return chat(f"Request {i}: describe the system.", max_tokens=tokens, ignore_eos=True)


def raw_generate(i: int, tokens: int) -> pb.GenerateRequest:
    """A greedy raw generation (no parser): its text is exactly its tokens' decoding."""
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[100 + i, 200, 300, 400]),
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


def assert_exact(streams: list[Stream], tokens: int, backend: object) -> None:
    """Every stream complete, one Started, exactly ``tokens`` tokens, text = their decoding."""
    for stream in streams:
        assert stream.complete, (stream.status, stream.error)
        assert stream.started == 1
        assert len(stream.token_ids) == tokens
        expected = backend.decode(stream.token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        # vLLM holds back a trailing incomplete UTF-8 sequence at the very end of a stream.
        assert stream.content == expected.rstrip("\ufffd")


def outcome(streams: list[Stream], expected_tokens: int | None = None) -> Outcome:
    duplicates = sum(
        1
        for s in streams
        if s.started > 1 or (expected_tokens and s.complete and len(s.token_ids) > expected_tokens)
    )
    missing = sum(
        1 for s in streams if expected_tokens and s.complete and len(s.token_ids) < expected_tokens
    )
    return Outcome(
        sent=len(streams),
        completed=sum(s.complete for s in streams),
        failed_clear=sum((not s.complete) and s.clear_failure for s in streams),
        lost=sum((not s.complete) and not s.clear_failure for s in streams) + missing,
        duplicates=duplicates,
    )


# ------------------------------------------------------------------ the queue directly


async def submit_claimed_by_ghost(
    queue: RouterQueue, job: Job, retrycount: int = 0, consumer: str = "ghost-worker"
) -> bytes:
    """Queue ``job`` and, atomically, claim it as ``consumer``, which never runs it.

    With a consumer that never heartbeats, that is the state a SIGKILLed worker leaves:
    the job pending on a dead consumer.
    """
    keys = Keys(PREFIX)
    async with queue.redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.jobs, encode(job))  # type: ignore[arg-type]
        pipe.xreadgroup(WORKER_GROUP, consumer, {keys.jobs: ">"}, count=1)
        _, claimed = await pipe.execute()
    entry_id: bytes = claimed[0][1][0][0]
    if retrycount:
        await queue.redis.xclaim(
            keys.jobs, WORKER_GROUP, consumer, 0, [entry_id], retrycount=retrycount
        )
    return entry_id


async def submit_as_router(
    stack: FaultStack, router_id: str, tokens: int = 6
) -> tuple[RouterQueue, Job]:
    queue = stack.queue(router_id)
    await queue.heartbeat()
    job = make_job(
        chat("Reclaim me", max_tokens=tokens, ignore_eos=True),
        router_id=router_id,
        reply_stream=queue.reply_stream,
        deadline_unix_ms=0,
        trace={},
    )
    return queue, job


async def replies_until_terminal(queue: RouterQueue, timeout: float = 120) -> list[pb.ChatEvent]:
    events: list[pb.ChatEvent] = []
    last, deadline = b"0-0", time.monotonic() + timeout
    while time.monotonic() < deadline:
        await queue.heartbeat()
        for entry_id, reply in await queue.read_replies(last, block_ms=500):
            last = entry_id
            assert isinstance(reply, Reply)
            events.extend(reply.events)
        if events and events[-1].WhichOneof("event") in ("usage", "error"):
            return events
    raise AssertionError(f"no terminal event; got {events}")
