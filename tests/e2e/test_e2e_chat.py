"""End to end: real gRPC client → router → Redis Streams → worker → vLLM CPU engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from tests.conftest import Stack
from tests.support.calls import chat, collect, status_of, wait_engines_idle

pytestmark = pytest.mark.e2e

Stub = serve_pb2_grpc.InferenceStub


async def test_chat_streams_to_completion_with_usage(stub: Stub) -> None:
    result = await collect(stub, chat("Tell me about Redis streams.", max_tokens=12))
    assert result.kinds() == ["started", "delta", "finished", "usage"]
    started = result.of("started")[0].started
    assert started.request_id.startswith("req_") and len(started.request_id) > 20
    finished = result.of("finished")[0].finished
    assert finished.reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    usage = result.of("usage")[0].usage
    assert usage.prompt_tokens > 5
    assert usage.completion_tokens == len(result.token_ids()) > 0
    if finished.reason == pb.FINISH_REASON_LENGTH:
        assert usage.completion_tokens == 12


async def test_eight_concurrent_chats_complete(stub: Stub) -> None:
    requests = [chat(f"Question number {i}", max_tokens=10, ignore_eos=True) for i in range(8)]
    results = await asyncio.gather(*(collect(stub, r) for r in requests))
    ids = {r.of("started")[0].started.request_id for r in results}
    assert len(ids) == 8
    for result in results:
        assert result.kinds()[-2:] == ["finished", "usage"]
        assert len(result.token_ids()) == 10


async def test_sixty_four_concurrent_streams_complete(stub: Stub) -> None:
    """More streams than the engine runs at once: the rest wait in the queue, none is lost."""
    requests = [chat(f"Stream {i}", max_tokens=4, ignore_eos=True) for i in range(64)]
    results = await asyncio.gather(*(collect(stub, r, timeout=300) for r in requests))
    assert len({r.of("started")[0].started.request_id for r in results}) == 64
    assert all(len(r.token_ids()) == 4 and r.kinds()[-1] == "usage" for r in results)


async def test_thinking_chat_counts_its_reasoning(stub: Stub) -> None:
    """Usage counts what streamed as reasoning (the template opens <think> in the prompt)."""
    request = chat("Think it over.", max_tokens=24, ignore_eos=True)
    request.enable_thinking = True
    result = await collect(stub, request)
    usage = result.of("usage")[0].usage
    reasoning = "".join(e.delta.reasoning for e in result.of("delta"))
    content = "".join(e.delta.content for e in result.of("delta"))
    assert usage.completion_tokens == 24 and reasoning
    if not content and not any(e.delta.tool_calls for e in result.of("delta")):
        assert usage.reasoning_tokens == usage.completion_tokens
    else:  # the random model closed its reasoning: the rest is not counted
        assert 0 < usage.reasoning_tokens < usage.completion_tokens


async def test_generate_with_token_ids(stub: Stub) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[10, 20, 30, 40]),
        sampling=pb.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
    )
    result = await collect(stub, request)
    assert result.of("usage")[0].usage.prompt_tokens == 4
    assert len(result.token_ids()) == 5


async def test_client_request_id_is_echoed(stub: Stub) -> None:
    request = chat(max_tokens=2)
    request.client_request_id = "trace-me.42"
    result = await collect(stub, request)
    assert result.of("started")[0].started.client_request_id == "trace-me.42"


async def test_cancelled_stream_frees_its_engine_slot(stub: Stub, stack: Stack) -> None:
    call = stub.Chat(chat(max_tokens=3000, ignore_eos=True), timeout=120)
    seen = 0
    async for event in call:
        seen += event.HasField("delta")
        if seen >= 3:
            break
    call.cancel()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_short_deadline_ends_with_deadline_exceeded(stub: Stub, stack: Stack) -> None:
    error = await status_of(stub, chat(max_tokens=3000, ignore_eos=True), timeout=1.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_abort_rpc_ends_the_stream(stub: Stub, stack: Stack) -> None:
    call = stub.Chat(chat(max_tokens=3000, ignore_eos=True), timeout=120)
    events = []
    async for event in call:
        events.append(event)
        if event.HasField("started"):
            reply = await stub.Abort(pb.AbortRequest(request_id=event.started.request_id))
            assert reply.found
    finished = [e.finished for e in events if e.HasField("finished")]
    assert finished and finished[0].reason == pb.FINISH_REASON_ABORT
    assert events[-1].HasField("usage")
    again = await stub.Abort(pb.AbortRequest(request_id=events[0].started.request_id))
    assert not again.found  # idempotent: aborting a finished request is harmless


async def test_full_router_answers_resource_exhausted(stack: Stack) -> None:
    proc, target = stack.router("--max-inflight", "1", name="router-small")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            small = serve_pb2_grpc.InferenceStub(channel)
            long_call = small.Chat(chat(max_tokens=3000, ignore_eos=True), timeout=120)
            await long_call.read()  # Started: the one slot is taken
            error = await status_of(small, chat(max_tokens=2))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(error.trailing_metadata() or ())
            assert int(trailers["retry-after-ms"]) > 0
            long_call.cancel()
    finally:
        proc.stop()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_health_and_reflection(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "qwen_serve.api.v1.Inference"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in refl.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert "qwen_serve.api.v1.Inference" in names


async def test_model_info(stub: Stub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_context_tokens >= 1024
    assert info.max_images_per_prompt == 2
    assert info.live_workers == 1
    assert info.reasoning_parser == "qwen3" and info.tool_call_parser == "qwen3_coder"
    assert info.served_model_name
