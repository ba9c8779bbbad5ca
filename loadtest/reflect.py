"""Resolve a method by server reflection, as ghz does without ``--proto``.

The server's reflection service supplies the file descriptors; the request
and response classes are built from them, so the load generator needs no
generated code of the service it calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loadtest.options import OptionsError, normalise_call


@dataclass(frozen=True)
class Method:
    """A resolved RPC: its path, message classes and streaming shape."""

    path: str
    request_cls: type[Message]
    response_cls: type[Message]
    server_streaming: bool
    client_streaming: bool

    def request(self, data: dict[str, Any]) -> Message:
        """The request message for one JSON object (proto3 JSON mapping)."""
        message = self.request_cls()
        try:
            json_format.ParseDict(data, message)
        except json_format.ParseError as exc:
            raise OptionsError(f"-d/-D: not a {self.request_cls.__name__}: {exc}") from exc
        return message


def resolve(channel: grpc.Channel, call: str) -> Method:
    """Look ``call`` up through the reflection service reachable over ``channel``."""
    service_name, _, method_name = normalise_call(call).partition("/")
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError as exc:
        raise OptionsError(f"--call: the server does not list service {service_name!r}") from exc
    except grpc.RpcError as exc:
        raise OptionsError(f"--call: server reflection failed: {exc.code().name}") from exc
    method = service.methods_by_name.get(method_name)
    if method is None:
        known = ", ".join(sorted(service.methods_by_name))
        raise OptionsError(f"--call: {service_name} has no method {method_name!r} ({known})")
    if method.client_streaming:
        raise OptionsError("--call: client-streaming methods are not supported")
    return Method(
        path=f"/{service_name}/{method_name}",
        request_cls=message_factory.GetMessageClass(method.input_type),
        response_cls=message_factory.GetMessageClass(method.output_type),
        server_streaming=method.server_streaming,
        client_streaming=method.client_streaming,
    )


class _WithMetadata(grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds fixed metadata to the reflection stream (an API key, say)."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = tuple(metadata.items())

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, requests)


def resolve_at(
    host: str,
    call: str,
    insecure: bool,
    timeout_s: float = 10.0,
    metadata: dict[str, str] | None = None,
) -> Method:
    """Connect to ``host`` and resolve ``call`` (fails with OptionsError when unreachable)."""
    channel = _channel(host, insecure)
    if metadata:
        channel = grpc.intercept_channel(channel, _WithMetadata(metadata))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return resolve(channel, call)
    except grpc.FutureTimeoutError as exc:
        raise OptionsError(f"host: cannot connect to {host} within {timeout_s:.0f} s") from exc
    finally:
        channel.close()


def _channel(host: str, insecure: bool) -> grpc.Channel:
    if insecure:
        return grpc.insecure_channel(host)
    return grpc.secure_channel(host, grpc.ssl_channel_credentials())
