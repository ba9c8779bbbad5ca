"""The queue's byte format."""

from __future__ import annotations

import pickle

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import (
    BATCH_FIELD,
    FIELD,
    CodecError,
    Job,
    Reply,
    WorkerStatus,
    decode,
    decode_replies,
    encode,
    encode_replies,
)
from qwen_serve.queue.keys import Keys
from tests.support.calls import chat


def test_job_round_trips() -> None:
    job = Job(request_id="req_x", router_id="r1", reply_stream="qs:replies:r1", tenant="t")
    job.chat.CopyFrom(chat("hi", max_tokens=3))
    job.trace_context["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    fields = encode(job)
    assert list(fields) == [FIELD]
    assert decode(Job, fields) == job


def test_reply_and_status_round_trip() -> None:
    reply = Reply(
        request_id="req_x", worker_id="w", events=[pb.ChatEvent(delta=pb.Delta(content="a"))]
    )
    assert decode(Reply, encode(reply)) == reply
    status = WorkerStatus(worker_id="w", capacity=8, running=2)
    assert decode(WorkerStatus, status.SerializeToString()) == status


def test_garbage_is_a_codec_error_not_an_evaluation() -> None:
    with pytest.raises(CodecError):
        decode(Job, {FIELD: b"\xff\xff\xff\xff"})
    with pytest.raises(CodecError):
        decode(Job, {b"other": b""})
    evil = pickle.dumps(object())
    with pytest.raises(CodecError):
        decode(Job, {FIELD: evil})


def test_key_names_share_the_prefix() -> None:
    keys = Keys("p")
    names = [
        keys.jobs,
        keys.aborts,
        keys.workers,
        keys.routers,
        keys.replies("r"),
        keys.abort_marker("q"),
        keys.worker_status("w"),
    ]
    assert all(n.startswith("p:") for n in names)
    assert len(set(names)) == len(names)


def test_reply_batches_round_trip_and_single_replies_still_decode() -> None:
    replies = [Reply(request_id="a", worker_id="w"), Reply(request_id="b", worker_id="w")]
    fields = encode_replies(replies)
    assert list(fields) == [BATCH_FIELD]
    assert decode_replies(fields) == replies
    assert decode_replies(encode(replies[0])) == replies[:1]
    with pytest.raises(CodecError):
        decode_replies({BATCH_FIELD: b"\xff\xff"})
