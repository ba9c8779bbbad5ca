"""The queue's byte format: protobuf messages in a single stream field.

A stream entry is ``{b"m": <serialised message>}``, except on reply streams,
whose entries are ``{b"b": <serialised ReplyBatch>}`` (several replies per
entry; readers still accept a single ``b"m"`` Reply, the format of workers
before ReplyBatch). String values (a lease) are the serialised message
itself. Decoding never evaluates data: a malformed entry raises
:class:`CodecError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from qwen_serve.queue.v1.queue_pb2 import Job, Lease, Reply, ReplyBatch, WorkerStatus

__all__ = [
    "BATCH_FIELD",
    "FIELD",
    "CodecError",
    "Job",
    "Lease",
    "Reply",
    "WorkerStatus",
    "decode",
    "decode_lease",
    "decode_replies",
    "encode",
    "encode_replies",
]

FIELD = b"m"
BATCH_FIELD = b"b"
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


def encode_replies(replies: Sequence[Reply]) -> dict[bytes, bytes]:
    """One reply-stream entry holding ``replies``."""
    return {BATCH_FIELD: ReplyBatch(replies=replies).SerializeToString()}


def decode_replies(fields: dict[bytes, bytes]) -> list[Reply]:
    """The replies of a reply-stream entry (a ReplyBatch, or one Reply)."""
    raw = fields.get(BATCH_FIELD)
    if raw is None:
        return [decode(Reply, fields)]
    return list(decode(ReplyBatch, raw).replies)


def job_priority(job: Job) -> int:
    """The API priority of a job's request (``Priority``; 0 when unset)."""
    kind = job.WhichOneof("request")
    return int(getattr(job, kind).priority) if kind else 0


def decode_lease(raw: bytes) -> Lease:
    """A lease value; the plain worker id that older workers stored reads as its holder."""
    try:
        lease = decode(Lease, raw)
    except CodecError:
        lease = None
    if lease is None or not (lease.worker_id or lease.fenced):
        return Lease(worker_id=raw.decode(errors="replace"))
    return lease
