"""Property-based fuzzing of the live router: only well-defined statuses, never INTERNAL."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.text(max_size=40)
json_texts = st.one_of(
    st.just(""), st.just("{}"), st.just('{"type": "object"}'), st.just("[1, 2]"), texts
)


@st.composite
def content_parts(draw: st.DrawFn) -> pb.ContentPart:
    if draw(st.booleans()):
        return pb.ContentPart(text=draw(texts))
    data = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        return pb.ContentPart(
            image=pb.Image(
                data=data,
                mime_type=draw(st.sampled_from(["image/png", "image/jpeg", "text/plain", ""])),
            )
        )
    return pb.ContentPart(
        image=pb.Image(
            url=draw(
                st.sampled_from(
                    [
                        "data:image/png;base64,AAAA",
                        "http://127.0.0.1:9/x.png",
                        "file:///etc/passwd",
                        "",
                    ]
                )
            )
        )
    )


@st.composite
def messages(draw: st.DrawFn) -> pb.Message:
    message = pb.Message(role=draw(st.integers(min_value=0, max_value=6)))  # type: ignore[arg-type]
    message.content.extend(draw(st.lists(content_parts(), max_size=3)))
    if draw(st.integers(0, 4)) == 0:
        message.tool_calls.add(id=draw(texts), name=draw(texts), arguments_json=draw(json_texts))
    message.tool_call_id = draw(st.sampled_from(["", "call_1"]))
    return message


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    params = pb.SamplingParams(max_tokens=draw(st.integers(0, 4)))
    floats = st.one_of(
        st.floats(min_value=-5, max_value=5, width=32),
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    )
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(params, name, draw(floats))
    for name, high in (("n", 12), ("top_logprobs", 30), ("min_tokens", 8)):
        if draw(st.booleans()):
            setattr(params, name, draw(st.integers(0, high)))
    if draw(st.booleans()):
        params.top_k = draw(st.integers(-5, 50))
    params.stop.extend(draw(st.lists(texts, max_size=3)))
    params.logprobs = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        params.seed = draw(st.integers(-(2**40), 2**40))
    return params


@st.composite
def chat_requests(draw: st.DrawFn) -> pb.ChatRequest:
    request = pb.ChatRequest(
        model=draw(st.sampled_from(["", "qwen3.5-tiny", "other-model"])),
        client_request_id=draw(st.sampled_from(["", "ok-id.1", "bad id", "x" * 200])),
        chat_template_kwargs_json=draw(st.sampled_from(["", "{}", "[", '{"enable_thinking": 1}'])),
    )
    request.messages.extend(draw(st.lists(messages(), max_size=3)))
    for _ in range(draw(st.integers(0, 2))):
        request.tools.add(
            name=draw(st.sampled_from(["get_weather", "bad name", ""])),
            parameters_json_schema=draw(json_texts),
        )
    request.tool_choice.mode = draw(st.integers(0, 5))  # type: ignore[assignment]
    request.tool_choice.function_name = draw(st.sampled_from(["", "get_weather", "nope"]))
    kind = draw(st.integers(0, 4))
    if kind == 1:
        request.structured_output.regex = draw(st.sampled_from(["[a-z]{1,3}", "(", "a|b"]))
    elif kind == 2:
        request.structured_output.json_schema = draw(json_texts)
    elif kind == 3:
        request.structured_output.choice.values.extend(draw(st.lists(texts, max_size=2)))
    request.sampling.CopyFrom(draw(sampling()))
    if draw(st.booleans()):
        request.enable_thinking = draw(st.booleans())
    return request


@pytest.fixture(scope="module")
def sync_stub(stack: Stack) -> Iterator[serve_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(stack.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]


def _code_of(stub: serve_pb2_grpc.InferenceStub, request: pb.ChatRequest) -> grpc.StatusCode:
    try:
        events = list(stub.Chat(request, timeout=60))
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    errors = [e.error for e in events if e.HasField("error")]
    assert not errors or errors[0].code != grpc.StatusCode.INTERNAL.value[0], errors
    return grpc.StatusCode.OK


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=chat_requests())
def test_random_chats_get_well_defined_statuses(
    sync_stub: serve_pb2_grpc.InferenceStub, request: pb.ChatRequest
) -> None:
    code = _code_of(sync_stub, request)
    assert code in ALLOWED, (code, request)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_requests(sync_stub: serve_pb2_grpc.InferenceStub, raw: bytes) -> None:
    try:
        request = pb.ChatRequest.FromString(raw)
    except Exception:  # not a parsable message: grpc would refuse it before our code
        return
    request.sampling.max_tokens = min(request.sampling.max_tokens, 4) or 1
    assert _code_of(sync_stub, request) in ALLOWED


def test_server_keeps_serving_after_fuzzing(sync_stub: serve_pb2_grpc.InferenceStub) -> None:
    request = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="still there?")])],
        sampling=pb.SamplingParams(max_tokens=3),
    )
    assert _code_of(sync_stub, request) == grpc.StatusCode.OK
