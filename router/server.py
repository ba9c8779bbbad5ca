"""Builds and runs the router's gRPC server.

Inference, grpc.health.v1 and server reflection (v1 and v1alpha) on one port, in plaintext or
TLS/mutual TLS with API keys (``router/security.py``). SIGTERM and
SIGINT drain: readiness goes NOT_SERVING, new calls are refused, open
streams get ``drain_grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_serve.api.v1 import serve_pb2, serve_pb2_grpc
from qwen_serve.queue.broker import router_queue
from qwen_serve.settings import RouterSettings
from router import observability, reflection, security, wire
from router.dispatcher import Dispatcher
from router.health import Health
from router.openai.app import RouterDoor
from router.openai.server import HttpServer
from router.servicer import InferenceServicer

logger = logging.getLogger(__name__)


def server_options(settings: RouterSettings) -> list[tuple[str, int]]:
    """Channel options: message size caps and keepalive."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class Router:
    """One router process: server, dispatcher and health."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.auth = security.Authenticator.from_settings(settings)
        self.credentials = security.server_credentials(settings)
        self.dispatcher = Dispatcher(router_queue(settings, settings.router_id), settings)
        observability.watch(self.dispatcher)
        self.health = Health()
        self.server = grpc.aio.server(
            options=server_options(settings),
            interceptors=[
                *observability.interceptors(),
                *security.interceptors(settings, self.auth),
                wire.DecodeGuard(),  # innermost: the others see its refusals
            ],
        )
        self.port = 0
        self.health_server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        if settings.http_listen:
            self.http = HttpServer(settings, RouterDoor(self.dispatcher, self.auth))

    async def start(self) -> None:
        """Bind the port and start serving."""
        serve_pb2_grpc.add_InferenceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.dispatcher, self.auth), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        names = (
            serve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        )
        reflection.enable(names, self.server)
        if self.credentials is None:
            self.port = self.server.add_insecure_port(self.settings.listen)
        else:
            self.port = self.server.add_secure_port(self.settings.listen, self.credentials)
        security.log_posture(self.settings, self.auth)
        await self.health.start()
        self.dispatcher.listeners.append(self.health.on_view)
        await self.dispatcher.start()
        await self.server.start()
        self.health_server = await security.start_health_server(self.settings, self.health.servicer)
        if self.http is not None:
            await self.http.start()
        logger.info(
            "router %s listening on %s (port %d)",
            self.settings.router_id,
            self.settings.listen,
            self.port,
        )

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new calls, let streams finish, then stop."""
        logger.info("draining for up to %.0f s", self.settings.drain_grace_s)
        await self.dispatcher.set_draining()
        await self.health.stop()
        http = self.http.stop() if self.http is not None else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(self.settings.drain_grace_s), http)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.dispatcher.stop()
        await self.dispatcher.queue.close()
        logger.info("router stopped")


async def serve(settings: RouterSettings) -> None:
    """Run a router until SIGTERM or SIGINT."""
    router = Router(settings)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop()
