"""Property-based fuzzing of the live stack: only well-defined statuses, never INTERNAL.

Requests are generated with structure (JSON-bearing fields of every depth, type
and size; images whose headers claim extreme dimensions), and raw bodies with
invalid UTF-8 go on the wire. The invariant: the call ends OK, INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION or RESOURCE_EXHAUSTED, no log gets a traceback,
and the server keeps serving.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from tests.conftest import Stack
from tests.support.calls import LogWatch

pytestmark = pytest.mark.e2e

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.text(max_size=40)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["<|image_pad|>", "<|video_pad|>", "</think>", "#", "$ref"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
schema_keywords = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["object", "string", "integer", "array", "null", ["string", "null"]]
        ),
        "properties": st.dictionaries(
            st.sampled_from(["a", "b", "city"]), st.deferred(lambda: schema_like), max_size=2
        ),
        "required": st.lists(st.sampled_from(["a", "b", "city"]), max_size=2),
        "enum": st.lists(json_scalars, max_size=3),
        "not": st.sampled_from([{}, True, {"type": "string"}]),
        "$ref": st.sampled_from(["#", "#/$defs/x", "#/nope", "http://x/y"]),
        "pattern": st.sampled_from(["^a+$", "[^\\s\\S]", "(", "\\d{2}"]),
        "anyOf": st.lists(st.deferred(lambda: schema_like), max_size=2),
        "minItems": st.integers(-1, 3),
        "$schema": st.sampled_from(["https://json-schema.org/draft/2020-12/schema", 5, {"a": 1}]),
    },
)
schema_like = st.one_of(st.booleans(), schema_keywords)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """Arrays and objects nested from a few levels to far past the 64-level limit."""
    levels = draw(st.sampled_from([1, 8, 63, 64, 65, 200, 999, 1000, 5000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    core = opener * levels + draw(st.sampled_from(["1", '""', "[]", "{}"])) + closer * levels
    return core


@st.composite
def json_texts_of(draw: st.DrawFn) -> str:
    """Text for a JSON-bearing field: structured values, deep nesting, schemas, or junk."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return json.dumps(draw(json_values))
    if kind == 1:
        return draw(deep_json())
    if kind == 2:
        return json.dumps(draw(schema_keywords))
    if kind == 3:
        return json.dumps({"enable_thinking": draw(json_values)})
    if kind == 4:
        return "x" * draw(st.sampled_from([0, 1, 10_000]))
    return draw(st.sampled_from(["", "{}", '{"type": "object"}', "[1, 2]", "{", "null", "1e999"]))


json_texts = json_texts_of()


def png_header(width: int, height: int, body: bool) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with a real image body or none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)) * min(height, 64)) if body else b""
    idat = chunk(b"IDAT", rows) if body else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


sides = st.one_of(
    st.sampled_from([0, 1, 2, 199, 200, 201, 2000, 65535, 2**31 - 1, 2**32 - 1]),
    st.integers(1, 400),
)


@st.composite
def extreme_images(draw: st.DrawFn) -> bytes:
    """Encoded images whose dimensions are extreme: header-only lies or real pixels."""
    width, height = draw(sides), draw(sides)
    if draw(st.booleans()) and 0 < width <= 600 and 0 < height <= 600:
        buffer = io.BytesIO()
        fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "WEBP"]))
        Image.new("RGB", (width, height), (9, 99, 199)).save(buffer, fmt)
        return buffer.getvalue()
    return png_header(width, height, draw(st.booleans()))


@st.composite
def content_parts(draw: st.DrawFn) -> pb.ContentPart:
    if draw(st.booleans()):
        return pb.ContentPart(text=draw(texts))
    data = draw(st.one_of(st.binary(max_size=64), extreme_images()))
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
        chat_template_kwargs_json=draw(json_texts),
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
        regexes = [
            "[a-z]{1,3}",
            "(",
            "a|b",
            "(?i)abc",
            "a++",
            "[^\\s\\S]",
            "x*[^\\d\\D]",
            "(" * 600 + ")" * 600,
        ]
        request.structured_output.regex = draw(st.sampled_from(regexes))
    elif kind == 2:
        request.structured_output.json_schema = draw(json_texts)
    elif kind == 3:
        request.structured_output.choice.values.extend(draw(st.lists(texts, max_size=2)))
    request.sampling.CopyFrom(draw(sampling()))
    if draw(st.booleans()):
        request.enable_thinking = draw(st.booleans())
    return request


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Raw prompts: placeholders and images in matching or clashing numbers, token ids."""
    request = pb.GenerateRequest(client_request_id=draw(st.sampled_from(["", "g-1"])))
    if draw(st.booleans()):
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        request.text = placeholder * draw(st.integers(0, 3)) + draw(texts) + "Describe."
    else:
        ids = st.one_of(st.integers(0, 4000), st.sampled_from([PAD_ID, VIDEO_PAD_ID, 2**31]))
        request.token_ids.ids.extend(draw(st.lists(ids, min_size=0, max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        request.images.add(data=draw(extreme_images()))
    kind = draw(st.integers(0, 3))
    if kind == 1:
        request.structured_output.json_schema = draw(json_texts)
    elif kind == 2:
        request.structured_output.regex = draw(st.sampled_from(["[0-9]+", "[^\\s\\S]", ")"]))
    request.sampling.CopyFrom(draw(sampling()))
    return request


PAD_ID = 3012
"""``<|image_pad|>`` in the tiny tokenizer (like TOOL_CALL_TOKEN_ID, an added token)."""
VIDEO_PAD_ID = 3013
"""``<|video_pad|>`` in the tiny tokenizer."""


@pytest.fixture(scope="module")
def sync_stub(stack: Stack) -> Iterator[serve_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(stack.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def raw_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def log_watch(stack: Stack) -> LogWatch:
    """What the stack logs while this module fuzzes it."""
    return LogWatch(stack.log_dir)


@pytest.fixture(autouse=True)
def _watching(log_watch: LogWatch) -> None:
    """Start watching the logs before the first test of the module."""


def _code_of(
    stub: serve_pb2_grpc.InferenceStub, request: pb.ChatRequest | pb.GenerateRequest
) -> grpc.StatusCode:
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    try:
        events = list(call(request, timeout=120))  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    errors = [e.error for e in events if e.HasField("error")]
    assert not errors, errors  # an Error event now always ends the call with its status
    return grpc.StatusCode.OK


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=chat_requests())
def test_random_chats_get_well_defined_statuses(
    sync_stub: serve_pb2_grpc.InferenceStub, request: pb.ChatRequest
) -> None:
    code = _code_of(sync_stub, request)
    assert code in ALLOWED, (code, request)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=generate_requests())
def test_random_generates_get_well_defined_statuses(
    sync_stub: serve_pb2_grpc.InferenceStub, request: pb.GenerateRequest
) -> None:
    code = _code_of(sync_stub, request)
    assert code in ALLOWED, (code, request)


def _raw_code(channel: grpc.Channel, method: str, body: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(f"/qwen_serve.api.v1.Inference/{method}")
    try:
        for _ in call(body, timeout=120):
            pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


MARK = "\u2603" * 4  # 12 bytes in UTF-8, replaced on the wire by as many other bytes


@st.composite
def bad_utf8_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request whose chosen string field carries invalid UTF-8 of the same length."""
    broken = draw(st.binary(min_size=12, max_size=12).filter(_not_utf8))
    where = draw(st.sampled_from(["text", "model", "tool", "schema", "kwargs", "generate"]))
    if where == "generate":
        generate = pb.GenerateRequest(text=MARK, sampling=pb.SamplingParams(max_tokens=2))
        return "Generate", generate.SerializeToString().replace(MARK.encode(), broken)
    request = pb.ChatRequest(sampling=pb.SamplingParams(max_tokens=2))
    request.messages.add(role=pb.ROLE_USER).content.add(text=MARK if where == "text" else "hi")
    if where == "model":
        request.model = MARK
    elif where == "tool":
        request.tools.add(name="f", description=MARK)
    elif where == "schema":
        request.structured_output.json_schema = MARK
    elif where == "kwargs":
        request.chat_template_kwargs_json = MARK
    return "Chat", request.SerializeToString().replace(MARK.encode(), broken)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=bad_utf8_bodies())
def test_invalid_utf8_on_the_wire_is_invalid_argument(
    raw_channel: grpc.Channel, case: tuple[str, bytes]
) -> None:
    method, body = case
    assert _raw_code(raw_channel, method, body) == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200), method=st.sampled_from(["Chat", "Generate"]))
def test_random_bytes_as_requests(raw_channel: grpc.Channel, raw: bytes, method: str) -> None:
    """Any bytes at all, sent as they are: the parser's refusals included."""
    try:
        kind = pb.ChatRequest if method == "Chat" else pb.GenerateRequest
        request = kind.FromString(raw)
    except Exception:  # not a parsable message: the server must say INVALID_ARGUMENT
        assert _raw_code(raw_channel, method, raw) == grpc.StatusCode.INVALID_ARGUMENT
        return
    request.sampling.max_tokens = min(request.sampling.max_tokens, 4) or 1
    assert _raw_code(raw_channel, method, request.SerializeToString()) in ALLOWED


def test_server_keeps_serving_after_fuzzing(sync_stub: serve_pb2_grpc.InferenceStub) -> None:
    request = pb.ChatRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="still there?")])],
        sampling=pb.SamplingParams(max_tokens=3),
    )
    assert _code_of(sync_stub, request) == grpc.StatusCode.OK


def test_no_log_got_a_traceback(log_watch: LogWatch) -> None:
    log_watch.assert_clean("Failed to detach context")
