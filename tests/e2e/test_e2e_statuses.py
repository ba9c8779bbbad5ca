"""Issue 14, end to end: statuses a mesh can see, and the protocol conventions.

- A stream that fails after Started sends its Error event, then ends with the
  same non-OK status and details (a BadRequest for a field) instead of OK.
- A retry hint also travels in gRPC's ``grpc-retry-pushback-ms`` trailer.
- Bodies that do not decode are INVALID_ARGUMENT, not UNKNOWN with a traceback.
- Reflection answers under ``grpc.reflection.v1`` as well as ``v1alpha``.
- The metrics endpoint binds the configured address.
- A burst of client cancellations leaves no OpenTelemetry error in the router's log.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_client import Client, StreamError, StreamFailed
from qwen_serve_client.errors import bad_field
from qwen_serve_dev import devstack
from tests.client_helpers import FAILS_MID_STREAM
from tests.conftest import Stack
from tests.support.calls import LogWatch, chat

pytestmark = pytest.mark.e2e

Stub = serve_pb2_grpc.InferenceStub
REGEX_FIELD = "structured_output.regex"


def _failing_chat() -> pb.ChatRequest:
    request = chat("Write x's.", max_tokens=200)
    request.structured_output.regex = FAILS_MID_STREAM
    return request


async def test_failure_after_started_ends_with_its_status_and_details(stub: Stub) -> None:
    events: list[pb.ChatEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for event in stub.Chat(_failing_chat(), timeout=300):
            events.append(event)
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "started" and "delta" in kinds and kinds[-1] == "error", kinds
    error = events[-1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.field == REGEX_FIELD and not error.retryable
    status = failure.value
    assert status.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details() == error.message
    assert bad_field(status) == REGEX_FIELD  # the worker's field, machine-readable


def test_python_sdk_keeps_the_error_event_and_ends_quietly(stack: Stack) -> None:
    with Client(stack.target, timeout=300) as client:
        stream = client.chat("Write x's.", think=False, max_tokens=200, regex=FAILS_MID_STREAM)
        events = list(stream)  # the status after the Error event raises nothing here
        assert isinstance(events[-1], StreamError) and events[-1].field == REGEX_FIELD
        assert stream.started is not None and stream.result.error == events[-1]
        with pytest.raises(StreamFailed) as failed:
            client.chat("Write x's.", think=False, max_tokens=200, regex=FAILS_MID_STREAM).collect()
        assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.field == REGEX_FIELD and not failed.value.retryable


async def test_overload_hint_travels_in_the_grpc_pushback_trailer(stack: Stack) -> None:
    proc, target = stack.router("--max-inflight", "1", name="router-pushback")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = serve_pb2_grpc.InferenceStub(channel)
            holder = stub.Chat(chat("hold the slot", max_tokens=3000, ignore_eos=True))
            assert (await anext(aiter(holder))).HasField("started")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await anext(aiter(stub.Chat(chat(max_tokens=2), timeout=60)))
            holder.cancel()
        status = refused.value
        assert status.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(status.trailing_metadata() or ())
        assert int(trailers["grpc-retry-pushback-ms"]) == 500  # RouterSettings.retry_after_ms
        assert trailers["retry-after-ms"] == trailers["grpc-retry-pushback-ms"]
    finally:
        proc.stop()


METHODS = {
    "/qwen_serve.api.v1.Inference/Chat": pb.ChatRequest,
    "/qwen_serve.api.v1.Inference/Generate": pb.GenerateRequest,
    "/qwen_serve.api.v1.Inference/GetModelInfo": pb.GetModelInfoRequest,
    "/qwen_serve.api.v1.Inference/Abort": pb.AbortRequest,
}


def _bad_utf8_chat() -> tuple[bytes, str]:
    request = chat("first")
    request.messages.add(role=pb.ROLE_USER).content.add(text="MARK")
    raw = request.SerializeToString().replace(b"MARK", b"\xff\xfe\xc3(")
    return raw, "messages[1].content[0].text"


async def test_undecodable_bodies_are_invalid_argument(stack: Stack) -> None:
    watch = LogWatch(stack.log_dir)
    raw, field = _bad_utf8_chat()
    async with grpc.aio.insecure_channel(stack.target) as channel:
        chat_call = channel.unary_stream("/qwen_serve.api.v1.Inference/Chat")
        with pytest.raises(grpc.aio.AioRpcError) as bad_text:
            await anext(aiter(chat_call(raw, timeout=30)))
        assert bad_text.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(bad_text.value) == field
        garbage = b"\xff\xff\xff\xff\x0fnot protobuf at all"
        for method in [*METHODS, "/grpc.health.v1.Health/Check"]:
            if method.endswith(("Chat", "Generate")):
                call = channel.unary_stream(method)(garbage, timeout=30)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await anext(aiter(call))
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(method)(garbage, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid" in (refused.value.details() or ""), method
        # Still serving.
        stub = serve_pb2_grpc.InferenceStub(channel)
        assert (await stub.GetModelInfo(pb.GetModelInfoRequest())).served_model_name
    watch.assert_clean()


async def _reflect(
    target: str, service: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return [response async for response in call(iter(requests), timeout=30)]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_as_v1_and_v1alpha(stack: Stack, version: str) -> None:
    service = f"grpc.reflection.{version}.ServerReflection"
    listed, inference, reflection = await _reflect(
        stack.target,
        service,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="qwen_serve.api.v1.Inference"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "qwen_serve.api.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert inference.file_descriptor_response.file_descriptor_proto
    assert not reflection.HasField("error_response"), reflection.error_response


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


async def test_metrics_endpoint_binds_the_configured_address(stack: Stack) -> None:
    port = devstack.free_port()
    flags = ("--metrics-port", str(port), "--metrics-host", "127.0.0.2")
    proc, _ = stack.router(*flags, name="router-metrics-host")
    try:
        assert "qwen_serve_requests" in await asyncio.to_thread(_scrape, "127.0.0.2", port)
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(_scrape, "127.0.0.1", port)
    finally:
        proc.stop()


async def _cancel_after(stub: Stub, events: int) -> None:
    call = stub.Chat(chat("go on and on", max_tokens=400, ignore_eos=True), timeout=120)
    seen = 0
    async for _ in call:
        seen += 1
        if seen >= events:
            break
    call.cancel()


async def test_cancellation_burst_leaves_no_telemetry_errors(stack: Stack, stub: Stub) -> None:
    watch = LogWatch(stack.log_dir, ("router.log",))
    await asyncio.gather(*(_cancel_after(stub, 1 + i % 3) for i in range(40)))
    assert (await stub.GetModelInfo(pb.GetModelInfoRequest())).served_model_name
    await asyncio.sleep(1)  # let the router finish the cancelled calls (not a timing assertion)
    watch.assert_clean("Failed to detach context")
