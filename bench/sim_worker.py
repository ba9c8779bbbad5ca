"""SIMULATED ENGINE for router-capacity benchmarks only: never the product, never in tests.

``python -m bench.sim_worker --redis-url URL --tokens 64 --rate 20`` runs the product's
worker loop (``worker.service.Worker``: claims, leases, abort markers, heartbeats,
acknowledgements, the coalescing ``ReplyWriter``) on :class:`SimEngine`, which answers
every job with ``--tokens`` Deltas at ``--rate`` tokens per second per stream, Finished
and Usage. Like a real engine's decode step, one ticker emits the next token of every
running stream at once. Each Delta's text is the emit time (``time.monotonic_ns()``),
so ``python -m loadtest --stamped-tokens`` measures the delivery delay of every token
through worker, Redis and router. In the spirit of llm-d's inference simulator; the
prompt is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field

from qwen_serve import aio
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import worker_queue
from qwen_serve.queue.codec import Job
from qwen_serve.settings import WorkerSettings, new_id
from worker.service import Worker

logger = logging.getLogger(__name__)

SIM_MODEL = "sim-engine"
CLAIM_BLOCK_MS = 100
DRAIN_GRACE_S = 1.0
"""A benchmark stops its worker between loads, with nothing left to finish."""


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


def closing_events(
    tokens: int, reason: pb.FinishReason = pb.FINISH_REASON_LENGTH
) -> list[pb.ChatEvent]:
    """Finished and Usage of a stream of ``tokens`` tokens."""
    return [
        pb.ChatEvent(finished=pb.Finished(index=0, reason=reason)),
        pb.ChatEvent(usage=pb.Usage(prompt_tokens=8, completion_tokens=tokens)),
    ]


@dataclass
class SimRequest:
    """One simulated generation in flight: what the ticker emitted and its reader has not."""

    remaining: int
    sent: int = 0
    aborted: bool = False
    ended: bool = False
    pending: deque[pb.ChatEvent] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, events: list[pb.ChatEvent]) -> None:
        """Hand ``events`` to the reader."""
        self.pending.extend(events)
        self.ready.set()


class SimEngine:
    """The worker's ``EngineLike`` (worker/service.py) without a model: paced tokens.

    :meth:`step_loop` is the decode loop; run it beside the worker.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.active: dict[str, SimRequest] = {}

    async def run(
        self, request_id: str, job: Job, wanted: Awaitable[bool]
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        """Stream one job's events as the ticker emits them (nothing if not ``wanted``)."""
        if not await wanted:
            return
        request = SimRequest(self.config.tokens)
        self.active[request_id] = request
        try:
            while not (request.ended and not request.pending):
                if not request.pending:
                    request.ready.clear()
                    await request.ready.wait()
                while request.pending:
                    yield request.pending.popleft()
        finally:
            self.active.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """End the request at the next step, with Finished (abort), as vLLM does."""
        request = self.active.get(request_id)
        if request is not None:
            request.aborted = True

    def num_unfinished(self) -> int:
        """Requests generating now."""
        return len(self.active)

    def model_info(self) -> pb.ModelInfo:
        """The simulated model."""
        return model_info(self.config.capacity)

    async def check_health(self) -> None:
        """Always healthy."""

    async def step_loop(self) -> None:
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
        for request in self.active.values():
            if request.ended:
                continue
            if request.aborted:
                request.ended = True
                request.emit(closing_events(request.sent, pb.FINISH_REASON_ABORT))
                continue
            events = [delta(request.sent)]
            request.sent += 1
            request.remaining -= 1
            if request.remaining <= 0:
                request.ended = True
                events += closing_events(request.sent)
            request.emit(events)


def worker_settings(redis_url: str, key_prefix: str, config: SimConfig) -> WorkerSettings:
    """The settings the simulated worker runs the product's loop with."""
    return WorkerSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        worker_id=new_id("simworker"),
        coalesce_ms=config.coalesce_ms,
        claim_block_ms=CLAIM_BLOCK_MS,
        drain_grace_s=DRAIN_GRACE_S,
    )


async def serve(settings: WorkerSettings, config: SimConfig) -> None:
    """Run one simulated worker until SIGTERM or SIGINT."""
    queue = worker_queue(settings, settings.worker_id, settings.claim_block_ms)
    engine = SimEngine(config)
    worker = Worker(settings, engine, queue, capacity=config.capacity)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    logger.info(
        "SIMULATED worker %s: %d tokens at %.0f tok/s",
        settings.worker_id,
        config.tokens,
        config.rate,
    )
    steps = asyncio.create_task(engine.step_loop())
    try:
        await worker.run()
    finally:
        steps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await steps
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
    config = SimConfig(args.tokens, args.rate, args.capacity, args.coalesce_ms)
    aio.run(serve(worker_settings(args.redis_url, args.key_prefix, config), config))


if __name__ == "__main__":
    main()
