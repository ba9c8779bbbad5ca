"""SIMULATED ENGINE for router-capacity benchmarks only: never the product, never in tests.

``python -m bench.sim_worker --redis-url URL --tokens 64 --rate 20`` joins the job
queue like a real worker (``WorkerQueue`` claims, heartbeats, acknowledges) and
answers every job with Started, ``--tokens`` Deltas at ``--rate`` tokens per second
per stream, Finished and Usage, through the product's ``ReplyWriter`` (coalescing,
pipelined XADD). Like a real engine's decode step, one ticker emits the next token
of every running stream at once. Each Delta's text is the emit time
(``time.monotonic_ns()``), so ``python -m loadtest --stamped-tokens`` measures the
delivery delay of every token through router and Redis. In the spirit of llm-d's
inference simulator; the prompt is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qwen_serve import aio
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import QueueUnavailable, WorkerQueue, worker_queue
from qwen_serve.queue.codec import Job, WorkerStatus
from qwen_serve.settings import SharedSettings, new_id
from worker.replies import ReplyWriter

logger = logging.getLogger(__name__)

SIM_MODEL = "sim-engine"


@dataclass
class SimStream:
    """One simulated generation in flight."""

    entry_id: bytes
    request_id: str
    reply_stream: str
    remaining: int
    sent: int = 0


@dataclass(frozen=True)
class SimConfig:
    """What the simulated engine emits."""

    tokens: int = 64
    rate: float = 20.0
    """Tokens per second per stream (one decode step every 1/rate s)."""
    capacity: int = 4096
    coalesce_ms: float = 2.0


def model_info(capacity: int) -> pb.ModelInfo:
    """What the simulated worker reports in its heartbeat."""
    return pb.ModelInfo(
        served_model_name=SIM_MODEL,
        model_path="simulated",
        max_context_tokens=1 << 20,
        max_images_per_prompt=2,
        vocab_size=65536,
        engine_version=f"bench.sim_worker (capacity {capacity})",
    )


def delta(index: int) -> pb.ChatEvent:
    """A one-token Delta whose text is its emit time in ns."""
    return pb.ChatEvent(
        delta=pb.Delta(content=f"{time.monotonic_ns()} ", token_ids=[index % 50_000])
    )


def closing_events(tokens: int) -> list[pb.ChatEvent]:
    """Finished and Usage of a stream of ``tokens`` tokens."""
    return [
        pb.ChatEvent(finished=pb.Finished(index=0, reason=pb.FINISH_REASON_LENGTH)),
        pb.ChatEvent(usage=pb.Usage(prompt_tokens=8, completion_tokens=tokens)),
    ]


class SimWorker:
    """Claims jobs and streams simulated tokens for them."""

    def __init__(self, queue: WorkerQueue, worker_id: str, config: SimConfig) -> None:
        self.queue = queue
        self.config = config
        self.worker_id = worker_id
        self.writer = ReplyWriter(queue, worker_id, config.coalesce_ms / 1000)
        self.status = WorkerStatus(worker_id=worker_id, capacity=config.capacity)
        self.status.model.CopyFrom(model_info(config.capacity))
        self.active: dict[str, SimStream] = {}
        self.stopping = asyncio.Event()
        self.emitted = 0
        self._bookkeeping: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue()

    async def run(self) -> None:
        """Serve until stop() is called."""
        await self.queue.ensure_group()
        await self.queue.heartbeat(self.status)
        tasks = [
            asyncio.create_task(coro)
            for coro in (
                self.writer.run(),
                self._heartbeat_loop(),
                self._step_loop(),
                self._bookkeeping_loop(),
            )
        ]
        try:
            await self._claim_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(QueueUnavailable):
                await self.queue.leave()

    def stop(self) -> None:
        """Stop claiming and leave."""
        self.stopping.set()

    async def _claim_loop(self) -> None:
        while not self.stopping.is_set():
            free = self.config.capacity - len(self.active)
            if free <= 0:
                await asyncio.sleep(0.01)
                continue
            try:
                claimed = await self.queue.claim(free, 100)
            except QueueUnavailable as exc:
                logger.warning("cannot claim: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for entry_id, job in claimed:
                self._start(entry_id, job)

    def _start(self, entry_id: bytes, job: Job | None) -> None:
        if job is None:
            self._ack(entry_id)
            return
        rid = job.request_id
        # The product worker's per-job round trip before its first token (its started
        # marker goes with the first reply flush), one at a time on one connection.
        self._bookkeeping.put_nowait(functools.partial(self.queue.is_aborted, rid))
        started = pb.Started(request_id=rid, model=SIM_MODEL)
        self.writer.put(job.request_id, job.reply_stream, pb.ChatEvent(started=started))
        self.active[job.request_id] = SimStream(
            entry_id, job.request_id, job.reply_stream, self.config.tokens
        )

    async def _step_loop(self) -> None:
        """One decode step per 1/rate s: the next token of every active stream."""
        interval = 1.0 / self.config.rate
        next_step = time.monotonic()
        while True:
            next_step += interval
            delay = next_step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_step = time.monotonic()  # overloaded: do not burst to catch up
            self._step()

    def _step(self) -> None:
        done: list[SimStream] = []
        for stream in self.active.values():
            self.writer.put(stream.request_id, stream.reply_stream, delta(stream.sent))
            stream.sent += 1
            stream.remaining -= 1
            if stream.remaining <= 0:
                done.append(stream)
        self.emitted += len(self.active)
        for stream in done:
            for event in closing_events(stream.sent):
                self.writer.put(stream.request_id, stream.reply_stream, event)
            del self.active[stream.request_id]
            self._ack(stream.entry_id)

    def _ack(self, entry_id: bytes) -> None:
        self._bookkeeping.put_nowait(functools.partial(self.queue.finish, entry_id))

    async def _bookkeeping_loop(self) -> None:
        """Per-job Redis calls in order (concurrent ones would exhaust redis-py's pool)."""
        while True:
            call = await self._bookkeeping.get()
            try:
                await call()
            except QueueUnavailable as exc:
                logger.warning("bookkeeping call failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.status.running = len(self.active)
            try:
                await self.queue.heartbeat(self.status)
            except QueueUnavailable as exc:
                logger.warning("heartbeat failed: %s", exc)


async def serve(settings: SharedSettings, config: SimConfig, worker_id: str) -> None:
    """Run one simulated worker until SIGTERM or SIGINT."""
    queue = worker_queue(settings, worker_id, block_ms=100)
    sim = SimWorker(queue, worker_id, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.stop)
    logger.info(
        "SIMULATED worker %s: %d tokens at %.0f tok/s", worker_id, config.tokens, config.rate
    )
    try:
        await sim.run()
    finally:
        await queue.close()


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench.sim_worker", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--key-prefix", default="qs")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--capacity", type=int, default=4096, help="streams at once")
    parser.add_argument("--coalesce-ms", type=float, default=2.0, help="ReplyWriter window")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = SharedSettings(redis_url=args.redis_url, key_prefix=args.key_prefix)
    config = SimConfig(args.tokens, args.rate, args.capacity, args.coalesce_ms)
    aio.run(serve(settings, config, new_id("simworker")))


if __name__ == "__main__":
    main()
