"""Request bodies that do not decode: INVALID_ARGUMENT naming the field, not UNKNOWN.

grpc.aio calls a method's request deserializer before any servicer code, and a
``DecodeError`` there (invalid UTF-8 in a string field, a truncated or garbled
body) would end the call with UNKNOWN and a traceback in the log.
:class:`DecodeGuard` gives every unary-request method a deserializer that
returns :class:`Undecodable` instead of raising, and a behaviour that answers
it with INVALID_ARGUMENT. :func:`locate` walks the protobuf wire format to name
the string field that holds bad UTF-8 (``messages[0].content[1].text``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from qwen_serve.errors import invalid
from router import errors

logger = logging.getLogger(__name__)

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Undecodable:
    """A request body the method's message type could not parse."""

    type_name: str
    field: str
    reason: str


class _Corrupt(Exception):
    """The bytes are not protobuf wire format."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Corrupt
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip(data: bytes, pos: int, wire: int) -> tuple[bytes | None, int]:
    """(the payload of a length-delimited value, else None; the position after it)."""
    if wire == _VARINT:
        return None, _varint(data, pos)[1]
    if wire in (_FIXED64, _FIXED32):
        end = pos + (8 if wire == _FIXED64 else 4)
    elif wire == _LENGTH:
        length, pos = _varint(data, pos)
        end = pos + length
    else:
        raise _Corrupt  # groups (3, 4) do not exist in proto3; 6 and 7 are not wire types
    if end > len(data):
        raise _Corrupt
    return (data[pos:end] if wire == _LENGTH else None), end


def _field_path(descriptor: Descriptor, data: bytes, prefix: str) -> str | None:
    """Path of the first string field holding invalid UTF-8, or None."""
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        payload, pos = _skip(data, pos, wire)
        field = descriptor.fields_by_number.get(number)
        if field is None or payload is None:
            continue
        index = seen.get(number, 0)
        seen[number] = index + 1
        path = f"{prefix}{field.name}" + (f"[{index}]" if field.is_repeated else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.message_type is not None:
            found = _field_path(field.message_type, payload, f"{path}.")
            if found is not None:
                return found
    return None


def locate(descriptor: Descriptor, data: bytes) -> tuple[str, str]:
    """(field, reason) for a body of ``descriptor``'s type that failed to parse."""
    try:
        path = _field_path(descriptor, data, "")
    except (_Corrupt, RecursionError):
        return "", f"the body is not a valid {descriptor.name} message"
    if path is None:
        return "", f"the body is not a valid {descriptor.name} message"
    return path, "is not valid UTF-8 (string fields must be UTF-8)"


def guarded(deserializer: Callable[[bytes], Any], descriptor: Descriptor) -> Callable[[bytes], Any]:
    """``deserializer`` returning :class:`Undecodable` instead of raising."""

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError and whatever else the parser raises
            field, reason = locate(descriptor, data)
            logger.info("undecodable %s: %s (%s)", descriptor.full_name, reason, exc)
            return Undecodable(descriptor.full_name, field, reason)

    return decode


def _refusing(behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        await errors.abort(context, invalid(request.field, request.reason))

    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await refuse(request, context)
                return
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await behavior(request, context)

    return unary


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Undecodable bodies of unary-request methods get INVALID_ARGUMENT (see module doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the unary-unary and unary-stream handlers whose request type is known."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        deserializer = handler.request_deserializer
        descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
        if not isinstance(descriptor, Descriptor):
            return handler
        if handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        return factory(
            _refusing(behavior, handler.response_streaming),
            request_deserializer=guarded(deserializer, descriptor),
            response_serializer=handler.response_serializer,
        )
