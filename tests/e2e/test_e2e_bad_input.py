"""Bad input gets a precise status naming the field, and the server keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_client.errors import bad_field
from qwen_serve_dev import devstack
from tests.conftest import Stack
from tests.support.calls import chat, collect, status_of, user

pytestmark = pytest.mark.e2e

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _with(**changes: object) -> pb.ChatRequest:
    request = chat(max_tokens=4)
    for key, value in changes.items():
        if key == "messages":
            del request.messages[:]
            request.messages.extend(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    return request


def _sampling(**fields: object) -> pb.ChatRequest:
    request = chat(max_tokens=4)
    for key, value in fields.items():
        setattr(request.sampling, key, value)
    return request


CASES = {
    "empty message list": (_with(messages=[]), INVALID, "messages"),
    "unknown role": (
        _with(messages=[pb.Message(role=9, content=[pb.ContentPart(text="hi")])]),  # type: ignore[arg-type]
        INVALID,
        "messages[0].role",
    ),
    "unset role": (
        _with(messages=[pb.Message(content=[pb.ContentPart(text="hi")])]),
        INVALID,
        "messages[0].role",
    ),
    "empty content": (
        _with(messages=[pb.Message(role=pb.ROLE_USER)]),
        INVALID,
        "messages[0].content",
    ),
    "empty text part": (
        _with(messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="")])]),
        INVALID,
        "messages[0].content",
    ),
    "max_tokens zero": (_sampling(max_tokens=0), INVALID, "sampling.max_tokens"),
    "max_tokens above the context": (
        _sampling(max_tokens=10_000_000),
        INVALID,
        "sampling.max_tokens",
    ),
    "prompt longer than the context": (
        _with(messages=[user("stream " * 9000)]),
        INVALID,
        "messages",
    ),
    "unknown model": (_with(model="gpt-unknown"), grpc.StatusCode.NOT_FOUND, "model"),
    "malformed client request id": (
        _with(client_request_id="bad id with spaces"),
        INVALID,
        "client_request_id",
    ),
    "temperature below zero": (_sampling(temperature=-1.0), INVALID, "sampling.temperature"),
    "n above the limit": (_sampling(n=100), INVALID, "sampling.n"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_chat_is_rejected_with_the_field(
    case: str, stub: serve_pb2_grpc.InferenceStub
) -> None:
    request, code, field = CASES[case]
    error = await status_of(stub, request)
    assert error.code() == code, error.details()
    assert field in (error.details() or "")
    # The server keeps serving.
    ok = await collect(stub, chat(max_tokens=2))
    assert ok.of("usage")


async def test_malformed_abort_id(stub: serve_pb2_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Abort(pb.AbortRequest(request_id="../../etc/passwd"))
    assert info.value.code() == INVALID
    assert "request_id" in (info.value.details() or "")


async def test_bad_token_id_in_generate(stub: serve_pb2_grpc.InferenceStub) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 4_000_000]), sampling=pb.SamplingParams(max_tokens=2)
    )
    error = await status_of(stub, request)  # type: ignore[arg-type]
    assert error.code() == INVALID
    assert "token_ids" in (error.details() or "")
    # Found by the worker, yet machine-readable like the router's own checks.
    assert bad_field(error) == "token_ids.ids[2]"
    assert (error.details() or "").startswith("token_ids.ids[2]: ")


async def _status_from_lone_router(
    stack: Stack, redis_url: str, *flags: str
) -> grpc.aio.AioRpcError:
    """A chat's status from an extra router started with ``flags``."""
    port = devstack.free_port()
    proc = devstack.start_router(redis_url, port, stack.log_dir, *flags, name=f"router-{port}")
    try:
        target = f"127.0.0.1:{port}"
        await _wait_listening(target)
        async with grpc.aio.insecure_channel(target) as channel:
            return await status_of(serve_pb2_grpc.InferenceStub(channel), chat(), timeout=10)
    finally:
        proc.stop()


async def test_one_token_prompt_is_refused_not_fatal(stub: serve_pb2_grpc.InferenceStub) -> None:
    """A one-token prompt kills vLLM 0.32's CPU engine; the worker refuses it instead."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[100]), sampling=pb.SamplingParams(max_tokens=2)
    )
    error = await status_of(stub, request)  # type: ignore[arg-type]
    assert error.code() == INVALID
    assert bad_field(error) == "token_ids"
    assert (await collect(stub, chat(max_tokens=2))).of("usage")


async def test_unreachable_redis_answers_unavailable(stack: Stack) -> None:
    dead_redis = f"redis://127.0.0.1:{devstack.free_port()}/0"
    error = await _status_from_lone_router(stack, dead_redis)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis" in (error.details() or "")


async def test_no_worker_answers_unavailable(stack: Stack) -> None:
    error = await _status_from_lone_router(stack, stack.redis_url, "--key-prefix", "no-workers")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "worker" in (error.details() or "")


async def _wait_listening(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
