"""The HTTP listener of the OpenAI-compatible API, on the router's own event loop.

It runs in the router process, beside the gRPC server, so both doors share one
dispatcher, one reply reader and one set of admission counters (why in-process:
docs/benchmarks.md, "HTTP door"). It binds ``http_listen`` with the gRPC port's
TLS (and client-certificate) settings, takes requests up to
``max_message_bytes``, and on stop lets open streams finish for ``drain_grace_s``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from qwen_serve.errors import INTERNAL, INVALID_ARGUMENT, NOT_FOUND, RequestError
from qwen_serve.settings import RouterSettings
from router import security
from router.openai.app import Door, OpenAIRoutes, error_response

logger = logging.getLogger(__name__)

BACKLOG = 1024
"""Pending connections the socket queues (aiohttp's default, 128, is low for load tests)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_listen(listen: str) -> tuple[str | None, int]:
    """``[::]:8000`` → (None, 8000): every interface, IPv4 and IPv6, as gRPC's ``[::]``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"http_listen {listen!r}: expected HOST:PORT, e.g. [::]:8000")
    host = host.strip("[]")
    return (None if host in ("", "::") else host), int(port)


def ssl_context(settings: RouterSettings) -> ssl.SSLContext | None:
    """The gRPC port's TLS settings for HTTPS (client certificates when a client CA is set)."""
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413, ...) and crashes in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = NOT_FOUND if exc.status == 404 else INVALID_ARGUMENT
        answer = error_response(RequestError(code, "", exc.reason))
        answer.set_status(exc.status, exc.reason)
        return answer
    except Exception as exc:
        logger.exception("HTTP handler failed")
        return error_response(RequestError(INTERNAL, "", f"{type(exc).__name__}: {exc}"))


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Name the server without its framework's version."""
    response.headers["Server"] = "qwen-serve"


class HttpServer:
    """The listener: start it after the dispatcher, stop it with the gRPC server."""

    def __init__(self, settings: RouterSettings, door: Door) -> None:
        if not settings.http_listen:
            raise ValueError("http_listen is not set")
        self.settings = settings
        self.host, self.port = split_listen(settings.http_listen)
        app = web.Application(
            middlewares=[openai_errors], client_max_size=settings.max_message_bytes
        )
        OpenAIRoutes(door, settings.auth_health).add_to(app)
        app.on_response_prepare.append(_server_header)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=settings.drain_grace_s,
        )

    async def start(self) -> int:
        """Bind and serve; returns the port (the chosen one when 0 was asked)."""
        await self.runner.setup()
        context = ssl_context(self.settings)
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=context, backlog=BACKLOG)
        await site.start()
        self.port = site.port
        scheme = "https" if context else "http"
        logger.info(
            "OpenAI-compatible API on %s (%s, port %d)",
            self.settings.http_listen,
            scheme,
            self.port,
        )
        if context is None and not security.is_loopback(self.settings.http_listen or ""):
            logger.warning(
                "HTTP API on %s WITHOUT TLS: keys and prompts cross the network in clear",
                self.settings.http_listen,
            )
        return self.port

    async def stop(self) -> None:
        """Stop listening; open requests get ``drain_grace_s`` to finish."""
        await self.runner.cleanup()
