"""Pure checks of issue 14: JSON depth, unsatisfiable constraints, wire decoding, placeholders."""

from __future__ import annotations

import pytest

from qwen_serve import jsontext, regexes, schemas
from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError, readable
from router import errors, reflection, validation, wire
from tests.support.calls import chat
from worker import placeholders


def test_json_depth_is_limited_without_recursion() -> None:
    assert jsontext.depth(1) == 0 and jsontext.depth([]) == 1
    assert jsontext.depth({"a": [[{"b": 1}]]}) == 4
    assert jsontext.load("[" * 64 + "]" * 64, "f") == jsontext.load("[" * 64 + "]" * 64, "f")
    for levels in (65, 1000, 10**6):
        with pytest.raises(RequestError, match="at most 64 levels") as info:
            jsontext.load("[" * levels + "]" * levels, "tools[0].parameters_json_schema")
        assert info.value.field == "tools[0].parameters_json_schema"
    with pytest.raises(RequestError, match="must be a JSON object"):
        jsontext.load_object("[1]", "f")
    for text in ('{"a": NaN}', "[Infinity]", "[1e400]"):
        with pytest.raises(RequestError, match="not valid JSON"):
            jsontext.load(text, "f")


@pytest.mark.parametrize(
    "schema",
    [
        False,
        {"not": {}},
        {"not": {"description": "anything"}},
        {"$ref": "#"},
        {"enum": []},
        {"type": "string", "enum": [1, None]},
        {"type": "integer", "const": "1"},
        {"allOf": [{"type": "string"}, False]},
        {"anyOf": [False, {"not": True}]},
        {"type": "object", "required": ["n"], "properties": {"n": {"$ref": "#"}}},
        {"type": "array", "minItems": 2, "items": False},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"type": "string", "pattern": "[^\\s\\S]"},
    ],
)
def test_unsatisfiable_schemas_are_found(schema: object) -> None:
    assert schemas.unsatisfiable(schema)


@pytest.mark.parametrize(
    "schema",
    [
        True,
        {},
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
        {"type": "object", "properties": {"next": {"$ref": "#"}}},
        {"required": ["a"], "properties": {"a": False}},  # any non-object matches
        {"$ref": "#/$defs/x", "enum": []},  # siblings of $ref are not followed
        {"$ref": "https://example.com/schema.json"},
        {"type": "integer", "const": 1.0},
    ],
)
def test_satisfiable_schemas_pass(schema: object) -> None:
    assert schemas.unsatisfiable(schema) is None


def test_regexes_that_match_nothing() -> None:
    for pattern in (r"[^\s\S]", r"x{3}y*[^\d\D]", r"(ab)+c[^\w\W]", r"[^\x00-\U0010ffff]"):
        assert regexes.unsatisfiable(pattern), pattern
    for pattern in (r"a|[^\s\S]", r"([^\s\S])?", r"[^\D0-9]", r"[a-z]{1,3}", r"(?=a)b"):
        assert regexes.unsatisfiable(pattern) is None, pattern


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r.structured_output, "regex", "(" * 1000 + ")" * 1000), "regex"),
        (lambda r: setattr(r.structured_output, "regex", "a{99999999999999999999}"), "regex"),
        (lambda r: setattr(r.structured_output, "regex", "[^\\s\\S]"), "regex"),
        (lambda r: setattr(r.structured_output, "json_schema", '{"not": {}}'), "json_schema"),
        (
            lambda r: setattr(r.structured_output, "json_schema", "[" * 999 + "]" * 999),
            "json_schema",
        ),
    ],
)
def test_router_refuses_bad_constraints(mutate: object, field: str) -> None:
    for request in (chat("hi"), pb.GenerateRequest(text="hi")):
        mutate(request)  # type: ignore[operator]
        check = (
            validation.check_chat
            if isinstance(request, pb.ChatRequest)
            else validation.check_generate
        )
        with pytest.raises(RequestError) as info:
            check(request)  # type: ignore[arg-type]
        assert info.value.field == f"structured_output.{field}"


def test_generate_image_limit_names_images() -> None:
    info = pb.ModelInfo(served_model_name="m", max_context_tokens=100, max_images_per_prompt=2)
    with pytest.raises(RequestError) as refused:
        validation.check_against_model("", pb.SamplingParams(), 3, info, "images")
    assert refused.value.field == "images"


def test_undecodable_bodies_are_located() -> None:
    request = chat("ok")
    request.messages.add(role=pb.ROLE_USER).content.add(text="ABCD")
    raw = request.SerializeToString().replace(b"ABCD", b"\xff\xfe\xfd\xfc")
    assert wire.locate(pb.ChatRequest.DESCRIPTOR, raw)[0] == "messages[1].content[0].text"
    assert wire.locate(pb.ChatRequest.DESCRIPTOR, b"\xff\xff\xff")[0] == ""
    decode = wire.guarded(pb.ChatRequest.FromString, pb.ChatRequest.DESCRIPTOR)
    assert isinstance(decode(raw), wire.Undecodable)
    assert decode(request.SerializeToString()) == request


def test_reflection_v1_descriptor_mirrors_v1alpha() -> None:
    v1 = reflection.v1_file()
    assert v1.package == "grpc.reflection.v1"
    method = v1.services_by_name["ServerReflection"].methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert reflection.v1_file() is v1 or reflection.v1_file().name == v1.name  # added once


def test_retry_hint_is_sent_as_grpc_pushback() -> None:
    exc = RequestError(8, "", "full", retryable=True, retry_after_ms=250)
    trailers = dict(errors.to_status(exc).trailing_metadata)
    assert trailers["grpc-retry-pushback-ms"] == "250" and trailers["retry-after-ms"] == "250"


def test_readable_drops_object_reprs_and_uses_the_cause() -> None:
    try:
        try:
            raise ValueError("absolute aspect ratio must be smaller than 200, got 2000.0")
        except ValueError as cause:
            raise ValueError("Failed to apply P on data={'images': [<Image at 0x7f12>]}") from cause
    except ValueError as exc:
        assert readable(exc) == "absolute aspect ratio must be smaller than 200, got 2000.0"
    assert readable(OSError("cannot identify image file <_io.BytesIO object at 0x7f0>")) == (
        "cannot identify image file"
    )


def test_placeholders_must_match_images() -> None:
    ids = {rules.IMAGE_PLACEHOLDER: 7, rules.VIDEO_PLACEHOLDER: 8}
    image = pb.Image(data=b"x")
    ok = pb.GenerateRequest(text="<|image_pad|> and <|image_pad|>", images=[image, image])
    placeholders.check_generate(ok, ids)
    cases = [
        (pb.GenerateRequest(text="<|image_pad|><|image_pad|>", images=[image]), "text"),
        (pb.GenerateRequest(text="<|image_pad|>"), "text"),
        (pb.GenerateRequest(text="none", images=[image]), "images"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 7, 2])), "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 8, 2])), "token_ids"),
    ]
    for request, field in cases:
        with pytest.raises(RequestError) as info:
            placeholders.check_generate(request, ids)
        assert info.value.field == field
    spelled = chat("see <|video_pad|>")
    with pytest.raises(RequestError) as info:
        validation.check_chat(spelled)  # a chat's text needs no tokenizer: the router's rule
    assert info.value.field == "messages[0].content[0].text"
    validation.check_chat(chat("no placeholder"))


def test_engine_failure_under_a_constraint_names_the_constraint() -> None:
    from dataclasses import dataclass, field

    from worker.events import request_stream

    @dataclass
    class Output:
        index: int = 0
        text: str = "x"
        token_ids: list[int] = field(default_factory=lambda: [5])
        logprobs: object = None
        finish_reason: str | None = "error"
        stop_reason: object = None

    @dataclass
    class RequestOutput:
        outputs: list[Output]
        prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2])
        num_cached_tokens: int = 0

    sampling = pb.SamplingParams()
    constrained = request_stream([None], None, sampling, None, constraint="structured_output.regex")
    with pytest.raises(RequestError) as info:
        constrained.feed(RequestOutput([Output()]))
    assert info.value.code == 3 and info.value.field == "structured_output.regex"
    with pytest.raises(RequestError) as info:
        request_stream([None], None, sampling, None).feed(RequestOutput([Output()]))
    assert info.value.code == 13 and info.value.retryable  # unconstrained: the engine failed


@pytest.mark.parametrize("declared", ["5", '{"a": 1}', "[]"])
def test_a_schema_uri_that_is_no_string_is_invalid(declared: str) -> None:
    text = f'{{"$schema": {declared}}}'
    with_tool = chat("hi")
    with_tool.tools.add(name="f", parameters_json_schema=text)
    with pytest.raises(RequestError) as info:
        validation.check_chat(with_tool)
    assert info.value.field == "tools[0].parameters_json_schema"
    constrained = chat("hi")
    constrained.structured_output.json_schema = text
    with pytest.raises(RequestError) as info:
        validation.check_chat(constrained)
    assert info.value.field == "structured_output.json_schema"
