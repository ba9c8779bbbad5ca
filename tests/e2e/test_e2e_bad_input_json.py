"""Issue 14, end to end: inputs that escaped validation now get a precise status.

Each test sends what the issue found (and the rest of its class) through the real
stack: router, Redis, worker, vLLM CPU engine. The answer must be INVALID_ARGUMENT
naming the field in a ``google.rpc.BadRequest`` detail, nothing may be retryable,
no traceback may reach a log, and the server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tokenizers import Tokenizer

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_client.errors import bad_field
from tests.conftest import Stack
from tests.support.calls import LogWatch, chat, collect, status_of, user
from tests.support.images import encode

pytestmark = pytest.mark.e2e

INVALID = grpc.StatusCode.INVALID_ARGUMENT
Stub = serve_pb2_grpc.InferenceStub


def nested(levels: int) -> str:
    """A JSON object holding arrays nested ``levels`` deep in all."""
    return '{"a": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def _with_json(field: str, text: str) -> pb.ChatRequest:
    request = chat(max_tokens=2)
    if field == "structured_output.json_schema":
        request.structured_output.json_schema = text
    elif field == "tools[0].parameters_json_schema":
        request.tools.add(name="f", parameters_json_schema=text)
    elif field == "messages[1].tool_calls[0].arguments_json":
        turn = pb.Message(role=pb.ROLE_ASSISTANT)
        turn.tool_calls.add(id="c1", name="f", arguments_json=text)
        request.messages.append(turn)
    else:
        request.chat_template_kwargs_json = text
    return request


JSON_FIELDS = [
    "structured_output.json_schema",
    "tools[0].parameters_json_schema",
    "messages[1].tool_calls[0].arguments_json",
    "chat_template_kwargs_json",
]


@pytest.fixture(autouse=True)
def clean_logs(stack: Stack) -> Iterator[None]:
    """No test here may put a traceback in the router's or worker's log."""
    watch = LogWatch(stack.log_dir)
    yield
    watch.assert_clean()


async def assert_invalid(
    stub: Stub, request: pb.ChatRequest | pb.GenerateRequest, field: str
) -> str:
    """The request fails with INVALID_ARGUMENT naming ``field``; returns the message."""
    error = await status_of(stub, request)  # type: ignore[arg-type]
    assert error.code() == INVALID, error.details()
    assert bad_field(error) == field, error.details()
    details = error.details() or ""
    assert details.startswith(f"{field}: ")
    assert " at 0x" not in details  # no object reprs
    return details


@pytest.mark.parametrize("levels", [100, 1000, 100_000])
@pytest.mark.parametrize("field", JSON_FIELDS)
async def test_deeply_nested_json_is_refused_in_every_json_field(
    stub: Stub, field: str, levels: int
) -> None:
    details = await assert_invalid(stub, _with_json(field, nested(levels)), field)
    assert "at most 64 levels" in details


async def test_json_nested_within_the_limit_is_served(stub: Stub) -> None:
    request = _with_json("chat_template_kwargs_json", nested(64))
    assert (await collect(stub, request)).of("usage")


@pytest.mark.parametrize(
    "kwargs", ['{"enable_thinking": {"a": 1}}', '{"enable_thinking": "no"}', '{"thinking": [1]}']
)
async def test_template_switch_of_the_wrong_type_is_invalid_not_retryable(
    stub: Stub, kwargs: str
) -> None:
    for thinking in (None, False):
        request = chat(max_tokens=2)
        request.chat_template_kwargs_json = kwargs
        if thinking is None:
            request.ClearField("enable_thinking")
        details = await assert_invalid(stub, request, "chat_template_kwargs_json")
        assert "must be true or false" in details


def _constrained(
    kind: str, value: str, generate: bool = False
) -> pb.ChatRequest | pb.GenerateRequest:
    request: pb.ChatRequest | pb.GenerateRequest
    if generate:
        request = pb.GenerateRequest(
            text="Once upon a time", sampling=pb.SamplingParams(max_tokens=4)
        )
    else:
        request = chat(max_tokens=4)
    setattr(request.structured_output, kind, value)
    return request


UNSATISFIABLE = [
    ("json_schema", '{"$ref": "#"}'),
    ("json_schema", '{"not": {}}'),
    ("json_schema", '{"type": "string", "enum": [1, 2]}'),
    (
        "json_schema",
        '{"$defs": {"n": {"type": "object", "required": ["n"], '
        '"properties": {"n": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}',
    ),
    ("json_schema", '{"type": "string", "pattern": "[^\\\\s\\\\S]"}'),
    ("regex", r"[^\s\S]"),
    ("regex", r"x{30}y*[^\s\S]"),
    ("regex", r"(ab)+c[^\s\S]"),
]


@pytest.mark.parametrize("generate", [False, True], ids=["chat", "generate"])
@pytest.mark.parametrize(("kind", "value"), UNSATISFIABLE)
async def test_unsatisfiable_constraint_names_its_field(
    stub: Stub, kind: str, value: str, generate: bool
) -> None:
    details = await assert_invalid(
        stub, _constrained(kind, value, generate), f"structured_output.{kind}"
    )
    assert "no value can match" in details or "no string can match" in details


async def test_unsatisfiable_constraint_the_engine_finds_names_its_field(stub: Stub) -> None:
    """Python's regex dialect sees a Unicode digit here; the engine's grammar sees none."""
    for generate in (False, True):
        request = _constrained("regex", r"[^\D0-9]", generate)
        details = await assert_invalid(stub, request, "structured_output.regex")
        assert "no output can satisfy this constraint" in details


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("regex", "(?i)abc"),  # Python's dialect, not the engine grammar's
        ("regex", "a++"),
        ("regex", r"(?<=a)b"),
        ("json_schema", '{"type": "array", "minItems": 1}'),  # xgrammar: no items allowed
        ("json_schema", '{"type": "number", "minimum": 5, "maximum": 1}'),
        ("json_schema", '{"type": "integer", "minimum": 1e400}'),
        ("json_schema", '{"const": NaN}'),
        ("json_schema", '{"$schema": {"a": 1}}'),
    ],
)
async def test_constraints_the_engine_cannot_compile_are_invalid_without_tracebacks(
    stub: Stub, kind: str, value: str
) -> None:
    """The engine's grammar backend refuses them before the engine runs (no log traceback)."""
    details = await assert_invalid(stub, _constrained(kind, value), f"structured_output.{kind}")
    assert "/project/" not in details  # no native source paths


async def test_unsatisfiable_tool_schema_names_the_tool(stub: Stub) -> None:
    request = _with_json("tools[0].parameters_json_schema", '{"$ref": "#"}')
    request.tool_choice.mode = pb.ToolChoice.MODE_REQUIRED
    await assert_invalid(stub, request, "tools[0].parameters_json_schema")


async def test_deeply_nested_regex_is_refused(stub: Stub) -> None:
    request = _constrained("regex", "(" * 1000 + "a" + ")" * 1000)
    await assert_invalid(stub, request, "structured_output.regex")
    request = _constrained("regex", "a{99999999999999999999}")
    await assert_invalid(stub, request, "structured_output.regex")


async def test_token_prompt_cut_inside_a_character_is_not_echoed(
    stub: Stub, tiny_model: Path
) -> None:
    prompt = [1247, 946, 893, 100, 101, 102, 103]  # "The quick brown" + 4 bytes of a character
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=3, temperature=0)
    )
    result = await collect(stub, request)
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert "The quick brown" in tokenizer.decode(prompt)
    text, generated = result.text(), result.token_ids()
    assert len(generated) == 3
    assert "quick brown" not in text
    assert text == tokenizer.decode(generated).rstrip("\ufffd")


def _image_chat(data: bytes) -> pb.ChatRequest:
    request = chat(max_tokens=2)
    request.messages[0].content.insert(0, pb.ContentPart(image=pb.Image(data=data)))
    return request


@pytest.mark.parametrize(("width", "height"), [(1, 2000), (2000, 1), (3, 700)])
async def test_extreme_aspect_ratio_names_the_image_with_a_readable_reason(
    stub: Stub, width: int, height: int
) -> None:
    details = await assert_invalid(
        stub, _image_chat(encode("PNG", (width, height))), "messages[0].content[0].image"
    )
    assert f"{width}x{height}" in details and "aspect ratio" in details and "200:1" in details
    generate = pb.GenerateRequest(
        text="<|vision_start|><|image_pad|><|vision_end|>Describe.",
        images=[pb.Image(data=encode("PNG", (width, height)))],
        sampling=pb.SamplingParams(max_tokens=2),
    )
    await assert_invalid(stub, generate, "images[0]")


async def test_extreme_but_accepted_images_are_served(stub: Stub) -> None:
    for width, height in ((1, 1), (1, 200), (28, 5600)):
        assert (await collect(stub, _image_chat(encode("PNG", (width, height))))).of("usage")


async def test_corrupt_image_message_shows_no_object(stub: Stub) -> None:
    details = await assert_invalid(
        stub, _image_chat(encode("PNG", (8, 8))[:40]), "messages[0].content[0].image"
    )
    assert "BytesIO" not in details


async def test_generate_with_too_many_images_names_images(stub: Stub) -> None:
    request = pb.GenerateRequest(
        text="<|vision_start|><|image_pad|><|vision_end|>" * 3 + "Compare.",
        images=[pb.Image(data=encode("PNG", (8, 8)))] * 3,
        sampling=pb.SamplingParams(max_tokens=2),
    )
    await assert_invalid(stub, request, "images")


PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize(
    ("placeholders", "images", "field"),
    [(2, 1, "text"), (1, 0, "text"), (3, 2, "text"), (0, 1, "images")],
)
async def test_generate_placeholders_and_images_must_match(
    stub: Stub, placeholders: int, images: int, field: str
) -> None:
    request = pb.GenerateRequest(
        text=PLACEHOLDER * placeholders + "Describe.",
        images=[pb.Image(data=encode("PNG", (8, 8)))] * images,
        sampling=pb.SamplingParams(max_tokens=2),
    )
    await assert_invalid(stub, request, field)


async def test_placeholder_tokens_need_images_in_token_prompts_and_chats(
    stub: Stub, tiny_model: Path
) -> None:
    vocab = json.loads((tiny_model / "tokenizer.json").read_text())["added_tokens"]
    pad = next(t["id"] for t in vocab if t["content"] == "<|image_pad|>")
    ids = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1247, 946, pad, 893]), sampling=pb.SamplingParams(max_tokens=2)
    )
    await assert_invalid(stub, ids, "token_ids")
    spelled = _image_chat(encode("PNG", (8, 8)))
    spelled.messages[0].content[1].text = "Look at <|image_pad|> this."
    await assert_invalid(stub, spelled, "messages[0].content[1].text")
    video = chat(max_tokens=2)
    video.messages[0].content[0].text = "And <|video_pad|> this."
    await assert_invalid(stub, video, "messages[0].content[0].text")
    in_tool = chat(max_tokens=2)
    in_tool.tools.add(name="f", description="see <|image_pad|>")
    await assert_invalid(stub, in_tool, "tools[0].description")


async def test_a_refused_image_request_does_not_break_the_next_one(stub: Stub) -> None:
    """A request refused after vLLM read its image, then the same image again."""
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    image = encode("PNG", (24, 24))
    too_long = _image_chat(image)
    too_long.sampling.max_tokens = info.max_context_tokens - 5
    await assert_invalid(stub, too_long, "sampling.max_tokens")
    for _ in range(2):
        assert (await collect(stub, _image_chat(image))).of("usage")


async def test_server_keeps_serving(stub: Stub) -> None:
    assert (await collect(stub, chat(max_tokens=2))).of("usage")
    request = pb.ChatRequest(
        messages=[user("still there?")], sampling=pb.SamplingParams(max_tokens=2)
    )
    assert (await collect(stub, request)).of("usage")
