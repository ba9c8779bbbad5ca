"""The ceiling for router capacity: a bare grpc.aio server streaming the same tokens.

``python -m bench.bare_server --port P --tokens 64 --rate 20`` serves
``qwen_serve.api.v1.Inference/Chat`` (and Generate) with no router, no Redis and
no validation: each call gets Started, ``--tokens`` one-token Deltas stamped with
their emit time (as ``bench.sim_worker`` sends them), Finished and Usage. One
ticker emits the next token of every open stream per step, like the simulated
engine, so the two differ only by the router and queue in between.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import grpc
from grpc_reflection.v1alpha import reflection

from bench.sim_worker import SIM_MODEL, closing_events, delta
from qwen_serve import aio
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc

logger = logging.getLogger(__name__)


class BareInference(serve_pb2_grpc.InferenceServicer):
    """Streams simulated tokens straight from the event loop."""

    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens = tokens
        self.interval = 1.0 / rate
        self.streams: set[asyncio.Queue[pb.ChatEvent | None]] = set()
        self._ids = 0

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatEvent]:
        """Started, the tokens as they are stepped, Finished, Usage."""
        async for event in self._serve():
            yield event

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatEvent]:
        """Same as Chat."""
        async for event in self._serve():
            yield event

    async def _serve(self) -> AsyncIterator[pb.ChatEvent]:
        self._ids += 1
        yield pb.ChatEvent(started=pb.Started(request_id=f"bare-{self._ids}", model=SIM_MODEL))
        queue: asyncio.Queue[pb.ChatEvent | None] = asyncio.Queue()
        self.streams.add(queue)
        try:
            for _ in range(self.tokens):
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self.streams.discard(queue)
        for event in closing_events(self.tokens):
            yield event

    async def step_loop(self) -> None:
        """One step per interval: the next token of every open stream."""
        next_step = time.monotonic()
        step = 0
        while True:
            next_step += self.interval
            delay = next_step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_step = time.monotonic()
            for queue in self.streams:
                queue.put_nowait(delta(step))
            step += 1


async def serve(port: int, tokens: int, rate: float) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    servicer = BareInference(tokens, rate)
    serve_pb2_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    names = (pb.DESCRIPTOR.services_by_name["Inference"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ticker = asyncio.create_task(servicer.step_loop())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("bare server on port %d: %d tokens at %.0f tok/s", port, tokens, rate)
    await stop.wait()
    ticker.cancel()
    await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    aio.run(serve(args.port, args.tokens, args.rate))


if __name__ == "__main__":
    main()
