"""PROTOTYPE for the placement benchmark: the HTTP API beside the router, not in it.

``python -m bench.http_beside --router 127.0.0.1:50051 --listen 127.0.0.1:8001`` serves
the router's own OpenAI-compatible routes (``router/openai/``) from a process of its
own, whose door forwards each request to the router's gRPC API over loopback (the
API key and trace context ride along; the router does every check). It exists to
measure that layout against the in-process listener (``python -m bench http``); the
product runs the listener in the router.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncGenerator

import grpc

from qwen_serve import aio
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.errors import RESOURCE_EXHAUSTED, UNAVAILABLE
from qwen_serve.settings import RouterSettings
from router import intake
from router.openai.app import Headers, Stream
from router.openai.server import HttpServer

logger = logging.getLogger(__name__)

FORWARDED = ("authorization", "traceparent", "tracestate")


class GrpcDoor:
    """A door that is a gRPC client of a router."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = serve_pb2_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]

    def authenticate(self, headers: Headers) -> str:
        """Nothing here: the router checks the forwarded key."""
        return ""

    async def open(
        self, request: intake.Request, tenant: str, headers: Headers, timeout: float | None
    ) -> Stream:
        """The router's events; a status before them becomes an Error event."""
        metadata = [(k.lower(), v) for k, v in headers if k.lower() in FORWARDED]
        if isinstance(request, pb.ChatRequest):
            call = self.stub.Chat(request, metadata=metadata, timeout=timeout)
        else:
            call = self.stub.Generate(request, metadata=metadata, timeout=timeout)
        return self._events(call)

    @staticmethod
    async def _events(call: grpc.aio.UnaryStreamCall) -> AsyncGenerator[pb.ChatEvent, None]:
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
            retryable = code in (UNAVAILABLE, RESOURCE_EXHAUSTED)
            error = pb.Error(code=code, message=exc.details() or "", retryable=retryable)
            yield pb.ChatEvent(error=error)
        finally:
            call.cancel()

    async def model(self) -> pb.ModelInfo:
        """GetModelInfo of the router."""
        info: pb.ModelInfo = await self.stub.GetModelInfo(pb.GetModelInfoRequest())
        return info

    def ready(self) -> bool:
        """Always (the router answers for itself)."""
        return True


async def serve(router: str, listen: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    settings = RouterSettings(http_listen=listen, drain_grace_s=1.0)
    server = HttpServer(settings, GrpcDoor(router))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_beside", description=__doc__)
    parser.add_argument("--router", required=True, help="the router's gRPC address")
    parser.add_argument("--listen", required=True, help="HTTP address, e.g. 127.0.0.1:8001")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    aio.run(serve(args.router, args.listen))


if __name__ == "__main__":
    main()
