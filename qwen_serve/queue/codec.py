"""The queue's byte format: protobuf messages in a single stream field.

A stream entry is ``{b"m": <serialised message>}``. Decoding never
evaluates data: a malformed entry raises :class:`CodecError`.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from qwen_serve.queue.v1.queue_pb2 import Job, Reply, WorkerStatus

__all__ = ["FIELD", "CodecError", "Job", "Reply", "WorkerStatus", "decode", "encode"]

FIELD = b"m"
M = TypeVar("M", bound=Message)


class CodecError(ValueError):
    """A queue entry that is not a valid message of the expected type."""


def encode(message: Message) -> dict[bytes, bytes]:
    """Stream-entry fields for one message."""
    return {FIELD: message.SerializeToString()}


def decode(kind: type[M], fields: dict[bytes, bytes] | bytes) -> M:
    """Parse a stream entry (or a raw value) as ``kind``."""
    raw = fields if isinstance(fields, bytes) else fields.get(FIELD)
    if raw is None:
        raise CodecError(f"entry has no {FIELD!r} field")
    message = kind()
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise CodecError(f"not a {kind.__name__}: {exc}") from exc
    return message
