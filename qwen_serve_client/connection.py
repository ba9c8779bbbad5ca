"""Connection settings shared by the sync and async clients: TLS, API key, retries.

Plain-text by default (``127.0.0.1:50051``); ``tls=True`` uses the system's
roots unless ``root_certificates`` is given, and a client certificate and key
make it mutual TLS. The API key travels as ``authorization: Bearer <key>``
metadata on every call.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
ENV_TARGET = "QWEN_SERVE_TARGET"
ENV_API_KEY = "QWEN_SERVE_API_KEY"

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that failed before its first event arrived.

    Only then is a retry safe: nothing was generated for the caller yet, and a
    status before the ``Started`` event means the request was not accepted. A
    stream is never retried after an event; the server's ``retryable`` flag on
    a later Error event tells the caller whether sending it again may help.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    )

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (the server's hint wins, capped)."""
        if hint is not None:
            return min(max(hint, 0.0), self.max_backoff)
        backoff = self.initial_backoff * self.multiplier ** (attempt - 1)
        return min(backoff, self.max_backoff) * random.uniform(0.8, 1.2)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a failure with ``code`` on attempt ``attempt`` (1-based) is retried."""
        return attempt < self.max_attempts and code in self.codes


NO_RETRY = RetryPolicy(max_attempts=1)


class ConnectionOptions(TypedDict, total=False):
    """Keyword options of the clients; see :class:`Connection`."""

    api_key: str | None
    tls: bool
    root_certificates: bytes | str | Path | None
    client_certificate: bytes | str | Path | None
    client_key: bytes | str | Path | None
    server_name: str | None
    timeout: float | None
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes from bytes, or from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Connection:
    """Where and how to connect.

    ``target`` defaults to ``$QWEN_SERVE_TARGET`` or 127.0.0.1:50051 and
    ``api_key`` to ``$QWEN_SERVE_API_KEY``. PEM inputs are bytes or file paths.
    ``timeout`` (seconds) is the default deadline of a call, retries included.
    """

    target: str = ""
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    client_certificate: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None
    timeout: float | None = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metadata: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    def resolved_target(self) -> str:
        """The target, after the environment default."""
        return self.target or os.environ.get(ENV_TARGET, "") or DEFAULT_TARGET

    def resolved_api_key(self) -> str | None:
        """The API key, after the environment default (None: send none)."""
        return self.api_key if self.api_key is not None else os.environ.get(ENV_API_KEY) or None

    def is_secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or any(
            v is not None for v in (self.root_certificates, self.client_certificate)
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS channel credentials (for secure channels only)."""
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together (mutual TLS)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_certificate),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options: message size caps, keepalive, TLS name override."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.primary_user_agent", "qwen-serve-client-python"),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return [*options, *self.options]

    def call_metadata(self, extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
        """Metadata of every call: the API key (if any), fixed and per-call extras."""
        key = self.resolved_api_key()
        auth = (("authorization", f"Bearer {key}"),) if key else ()
        return (*auth, *self.metadata, *extra)

    def sync_channel(self) -> grpc.Channel:
        """A blocking-API channel."""
        if self.is_secure():
            return grpc.secure_channel(
                self.resolved_target(), self.credentials(), self.channel_options()
            )
        return grpc.insecure_channel(self.resolved_target(), self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel."""
        if self.is_secure():
            return grpc.aio.secure_channel(
                self.resolved_target(), self.credentials(), self.channel_options()
            )
        return grpc.aio.insecure_channel(self.resolved_target(), self.channel_options())
