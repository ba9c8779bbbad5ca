"""Who may call the router: API keys mapped to tenants, TLS and mutual TLS.

API keys come once at start from ``api_keys_file`` (``QS_API_KEYS_FILE``),
one ``tenant:key`` or ``tenant:sha256:<hex digest of the key>`` per line
(``#`` comments and blank lines ignored; a tenant may hold several keys, for
rotation). Only SHA-256 digests are kept in memory. A caller sends
``authorization: Bearer <key>``; the digest of what it sends is compared in
constant time with every stored digest, and the matching key's tenant is
what per-tenant quotas count. Without a key file, auth is off (a warning
says so) and every caller is the anonymous tenant ``""``.

Health and reflection stay open by default (Kubernetes gRPC probes send no
metadata); ``auth_health`` puts them behind the same keys.
``python -m router.security new-key TENANT`` prints a fresh key and its line.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2_grpc

from qwen_serve.errors import UNAUTHENTICATED, RequestError
from qwen_serve.settings import RouterSettings
from router import errors, wire

logger = logging.getLogger(__name__)

Metadata: TypeAlias = Iterable[tuple[str, str | bytes]]

HEADER = "authorization"
DIGEST_PREFIX = "sha256:"
KEY_MIN_LENGTH = 16
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP/2 header value can carry
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
OPEN_BY_DEFAULT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def digest(key: str) -> bytes:
    """SHA-256 of an API key: the only form in which keys are kept."""
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    """A fresh API key (256 random bits)."""
    return "qsk_" + secrets.token_urlsafe(32)


def parse_keys(text: str, source: str = "api keys") -> list[tuple[str, bytes]]:
    """``(tenant, digest)`` per entry of a key file; ValueError names the bad line.

    Messages never quote a line: it may hold a key.
    """
    entries: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        tenant, sep, secret = line.partition(":")
        if not sep or not TENANT.fullmatch(tenant):
            raise ValueError(f"{where}: expected 'tenant:key' with a tenant of [A-Za-z0-9._-]")
        if secret.startswith(DIGEST_PREFIX):
            hex_digest = secret.removeprefix(DIGEST_PREFIX).lower()
            if not HEX_DIGEST.fullmatch(hex_digest):
                raise ValueError(f"{where}: a sha256: entry needs 64 hex digits")
            value = bytes.fromhex(hex_digest)
        elif len(secret) < KEY_MIN_LENGTH or not KEY.fullmatch(secret):
            raise ValueError(
                f"{where}: a key needs {KEY_MIN_LENGTH}+ visible ASCII characters, no spaces"
            )
        else:
            value = digest(secret)
        if value in seen:
            raise ValueError(f"{where}: the same key appears twice")
        seen.add(value)
        entries.append((tenant, value))
    return entries


class Authenticator:
    """Maps the ``authorization`` metadata of a call to its tenant."""

    def __init__(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self._entries = tuple(entries)

    @classmethod
    def from_file(cls, path: str) -> Authenticator:
        """Keys from a key file (read once); warns if other users may read it."""
        file = Path(path)
        entries = parse_keys(file.read_text(encoding="utf-8"), str(file))
        if not entries:
            raise ValueError(f"{file} holds no API key")
        if file.stat().st_mode & 0o004:
            logger.warning("API key file %s is readable by every user (chmod o-r)", file)
        return cls(entries)

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> Authenticator:
        """Keys from ``settings.api_keys_file``; auth is off when it is unset."""
        if settings.api_keys_file:
            return cls.from_file(settings.api_keys_file)
        if settings.auth_health:
            raise ValueError("auth_health needs api_keys_file")
        return cls(())

    @property
    def enabled(self) -> bool:
        """Whether calls need a key."""
        return bool(self._entries)

    @property
    def tenants(self) -> set[str]:
        """Tenants that hold a key."""
        return {tenant for tenant, _ in self._entries}

    def tenant(self, metadata: Metadata | None) -> str:
        """The caller's tenant; ``""`` when auth is off.

        Raises RequestError(UNAUTHENTICATED, "authorization") for a missing,
        malformed or unknown key.
        """
        if not self.enabled:
            return ""
        values = [value for key, value in metadata or () if key.lower() == HEADER]
        if len(values) != 1:
            problem = "missing" if not values else "sent more than once"
            raise _unauthenticated(f"API key {problem}: send '{HEADER}: Bearer <key>'")
        scheme, _, key = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthenticated(f"expected '{HEADER}: Bearer <key>'")
        presented = digest(key.strip())
        found = ""
        for tenant, stored in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(stored, presented):
                found = tenant
        if not found:
            raise _unauthenticated("unknown API key")
        return found


def _unauthenticated(message: str) -> RequestError:
    return RequestError(UNAUTHENTICATED, HEADER, message)


class OpenServicesAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Puts health and reflection behind the API keys (``auth_health``).

    Inference methods authenticate in the servicer, which needs the tenant.
    """

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Refuse health and reflection calls without a valid key."""
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(OPEN_BY_DEFAULT):
            return handler
        try:
            self.auth.tenant(details.invocation_metadata)
        except RequestError as exc:
            return _refusing(handler, exc)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, exc: RequestError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``exc``."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await errors.abort(context, exc)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def interceptors(settings: RouterSettings, auth: Authenticator) -> list[grpc.aio.ServerInterceptor]:
    """Server interceptors for ``settings`` (none unless ``auth_health``)."""
    return [OpenServicesAuth(auth)] if settings.auth_health else []


def server_credentials(settings: RouterSettings) -> grpc.ServerCredentials | None:
    """TLS credentials (client certificates required when a client CA is set); None: plaintext."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    client_ca = settings.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not cert or not key:
        raise ValueError("tls_cert_file and tls_key_file must be set together")
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    if client_ca:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=Path(client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


async def start_health_server(
    settings: RouterSettings, servicer: health_pb2_grpc.HealthServicer
) -> grpc.aio.Server | None:
    """A plaintext server of grpc.health.v1 only on ``health_listen`` (None when unset).

    For kubelet gRPC probes, which cannot speak TLS to the main port; it tells
    only SERVING or NOT_SERVING.
    """
    if not settings.health_listen:
        return None
    server = grpc.aio.server(interceptors=[wire.DecodeGuard()])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(settings.health_listen)
    await server.start()
    logger.info("health only, plaintext, on %s (port %d)", settings.health_listen, port)
    return server


def is_loopback(listen: str) -> bool:
    """Whether a listen address only accepts local connections."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_posture(settings: RouterSettings, auth: Authenticator) -> None:
    """Say at start what protects this router, and warn where nothing does."""
    if auth.enabled:
        health = "required" if settings.auth_health else "not required"
        logger.info(
            "API keys on: %d tenants; key for health/reflection %s", len(auth.tenants), health
        )
    else:
        logger.warning("API keys are OFF: any caller is served (set QS_API_KEYS_FILE)")
    if settings.tls_cert_file:
        mtls = "required" if settings.tls_client_ca_file else "not required"
        logger.info("TLS on; client certificates %s", mtls)
    elif not is_loopback(settings.listen):
        logger.warning(
            "listening on %s WITHOUT TLS: keys and prompts cross the network in clear "
            "(set QS_TLS_CERT_FILE and QS_TLS_KEY_FILE, or terminate TLS in a mesh)",
            settings.listen,
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m router.security new-key TENANT``: a key and its key-file lines."""
    parser = argparse.ArgumentParser(prog="python -m router.security")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new-key", help="print a new API key for TENANT")
    make.add_argument("tenant")
    args = parser.parse_args(argv)
    if not TENANT.fullmatch(args.tenant):
        parser.error("a tenant is 1-64 characters of [A-Za-z0-9._-]")
    key = new_key()
    print(f"key (give to the client):  {key}")
    print(f"key-file line (plain):     {args.tenant}:{key}")
    print(f"key-file line (digest):    {args.tenant}:{DIGEST_PREFIX}{digest(key).hex()}")


if __name__ == "__main__":
    main()
