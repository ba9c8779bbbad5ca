"""API request -> vLLM conversion (worker/chat_input.py, constraints.py, sampling.py,
requests.py): pure functions, no engine. Rules the router checks for the worker are
tested here through ``router/validation.py``, with the field they name."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pytest
from PIL import Image as PILImage
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INVALID_ARGUMENT, RequestError
from router import validation
from tests.support.calls import chat
from worker import chat_input, constraints, requests
from worker.sampling import sampling_params

GEN_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def png(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def text(role: int, value: str) -> pb.Message:
    return pb.Message(role=role, content=[pb.ContentPart(text=value)])  # type: ignore[arg-type]


def fails(field: str) -> Any:
    """pytest.raises for a RequestError whose message names ``field``."""
    return pytest.raises(RequestError, match=re.escape(field))


def raised(excinfo: pytest.ExceptionInfo[RequestError]) -> tuple[int, str]:
    return excinfo.value.code, excinfo.value.field


# ------------------------------------------------------------------ messages


def test_chat_messages_roles_text_and_history() -> None:
    req = pb.ChatRequest(
        messages=[
            text(pb.ROLE_SYSTEM, "be brief"),
            text(pb.ROLE_USER, "weather?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                reasoning="need a tool",
                tool_calls=[pb.ToolCall(id="c1", name="get_weather", arguments_json='{"a": 1}')],
            ),
            pb.Message(
                role=pb.ROLE_TOOL, tool_call_id="c1", content=[pb.ContentPart(text="sunny")]
            ),
            pb.Message(role=pb.ROLE_USER, name="bob", content=[pb.ContentPart(text="thanks")]),
        ]
    )
    assert chat_input.chat_messages(req) == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": [],
            "reasoning": "need a tool",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"a": 1}'},
                }
            ],
        },
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}], "tool_call_id": "c1"},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}], "name": "bob"},
    ]


def test_image_parts_become_the_decoded_images_in_order() -> None:
    data = png()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    req = pb.ChatRequest(
        messages=[
            text(pb.ROLE_SYSTEM, "look"),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    pb.ContentPart(text="two"),
                    pb.ContentPart(image=pb.Image(data=data)),
                    pb.ContentPart(image=pb.Image(url=url)),
                ],
            ),
        ]
    )
    refs = chat_input.image_refs(req)
    assert [field for field, _ in refs] == [
        "messages[1].content[1].image",
        "messages[1].content[2].image",
    ]
    first, second = PILImage.new("RGB", (2, 2)), PILImage.new("RGB", (3, 3))
    images = {refs[0][0]: first, refs[1][0]: second}
    parts = chat_input.chat_messages(req, images)[1]["content"]
    assert parts[0] == {"type": "text", "text": "two"}
    assert parts[1] == {"type": "image_pil", "image_pil": first}
    assert parts[2] == {"type": "image_pil", "image_pil": second}
    with fails("messages[1].content[1].image"):
        chat_input.chat_messages(req)  # images must be loaded first (worker.images)


def routers(request: pb.ChatRequest | pb.GenerateRequest) -> tuple[int, str]:
    """(code, field) of the router's refusal of ``request`` (a rule the worker trusts)."""
    check = (
        validation.check_chat if isinstance(request, pb.ChatRequest) else validation.check_generate
    )
    with pytest.raises(RequestError) as excinfo:
        check(request)  # type: ignore[arg-type]
    return raised(excinfo)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.Message(content=[pb.ContentPart(text="x")]), "messages[0].role"),
        (pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart()]), "messages[0].content[0]"),
    ],
)
def test_bad_messages_name_the_field(message: pb.Message, field: str) -> None:
    """What the conversion cannot do without: a role, a content part of some kind."""
    with pytest.raises(RequestError) as excinfo:
        chat_input.chat_messages(pb.ChatRequest(messages=[message]))
    assert raised(excinfo) == (INVALID_ARGUMENT, field)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            pb.Message(role=pb.ROLE_USER, tool_calls=[pb.ToolCall(name="f")]),
            "messages[0].tool_calls",
        ),
        (
            pb.Message(
                role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(name="f", arguments_json="[1]")]
            ),
            "messages[0].tool_calls[0].arguments_json",
        ),
        (
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(arguments_json="{}")]),
            "messages[0].tool_calls[0].name",
        ),
        (
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="x")], reasoning="hm"),
            "messages[0].reasoning",
        ),
    ],
)
def test_message_rules_the_router_checks_name_the_field(message: pb.Message, field: str) -> None:
    assert routers(pb.ChatRequest(messages=[message])) == (INVALID_ARGUMENT, field)


def test_no_messages() -> None:
    assert routers(pb.ChatRequest()) == (INVALID_ARGUMENT, "messages")


# ------------------------------------------------------------------ tools


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def weather(**kw: str) -> pb.Tool:
    fields = {"name": "get_weather", "description": "Weather", "parameters_json_schema": ""}
    fields["parameters_json_schema"] = json.dumps(WEATHER_SCHEMA)
    fields.update(kw)
    return pb.Tool(**fields)


def test_tools() -> None:
    req = pb.ChatRequest(tools=[weather(), pb.Tool(name="noop")])
    assert chat_input.tools(req) == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather",
                "parameters": WEATHER_SCHEMA,
            },
        },
        {
            "type": "function",
            "function": {"name": "noop", "description": "", "parameters": {"type": "object"}},
        },
    ]
    assert chat_input.tools(pb.ChatRequest()) is None


BAD_TOOLS = [
    ([weather(parameters_json_schema="{nope")], "tools[0].parameters_json_schema"),
    ([weather(parameters_json_schema="[]")], "tools[0].parameters_json_schema"),
]
"""Tools whose parameters the conversion cannot parse."""


@pytest.mark.parametrize(("tools", "field"), BAD_TOOLS)
def test_bad_tools(tools: list[pb.Tool], field: str) -> None:
    with pytest.raises(RequestError) as excinfo:
        chat_input.tools(pb.ChatRequest(tools=tools))
    assert raised(excinfo) == (INVALID_ARGUMENT, field)


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        *BAD_TOOLS,
        ([weather(parameters_json_schema='{"type": 5}')], "tools[0].parameters_json_schema"),
        ([weather(name="bad name")], "tools[0].name"),
        ([weather(), weather()], "tools[1].name"),
    ],
)
def test_bad_tools_are_refused_by_the_router(tools: list[pb.Tool], field: str) -> None:
    request = chat("hi")
    request.tools.extend(tools)
    assert routers(request) == (INVALID_ARGUMENT, field)


def test_tool_choice() -> None:
    mode = pb.ToolChoice
    assert chat_input.tool_choice(pb.ChatRequest()) == "none"
    assert chat_input.tool_choice(pb.ChatRequest(tools=[weather()])) == "auto"
    with_tools = [weather()]
    for value, expected in [
        (mode.MODE_NONE, "none"),
        (mode.MODE_AUTO, "auto"),
        (mode.MODE_REQUIRED, "required"),
    ]:
        req = pb.ChatRequest(tools=with_tools, tool_choice=pb.ToolChoice(mode=value))
        assert chat_input.tool_choice(req) == expected
    named = pb.ToolChoice(mode=mode.MODE_FUNCTION, function_name="get_weather")
    assert chat_input.tool_choice(pb.ChatRequest(tools=with_tools, tool_choice=named)) == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    with fails("tool_choice.mode"):
        chat_input.tool_choice(pb.ChatRequest(tool_choice=pb.ToolChoice(mode=9)))  # type: ignore[arg-type]


def test_tool_choice_rules_are_the_routers() -> None:
    mode = pb.ToolChoice
    request = chat("hi")
    request.tools.append(weather())
    request.tool_choice.CopyFrom(pb.ToolChoice(mode=mode.MODE_FUNCTION, function_name="other"))
    assert routers(request) == (INVALID_ARGUMENT, "tool_choice.function_name")
    for choice, field in (
        (mode.MODE_AUTO, "tool_choice.mode"),
        (mode.MODE_REQUIRED, "tool_choice"),
        (9, "tool_choice.mode"),
    ):
        without_tools = chat("hi")
        without_tools.tool_choice.mode = choice  # type: ignore[assignment]
        assert routers(without_tools) == (INVALID_ARGUMENT, field)


def test_chat_template_kwargs() -> None:
    assert chat_input.chat_template_kwargs(pb.ChatRequest()) == {}
    req = pb.ChatRequest(
        enable_thinking=False, chat_template_kwargs_json='{"enable_thinking": true, "x": 1}'
    )
    assert chat_input.chat_template_kwargs(req) == {"enable_thinking": False, "x": 1}
    for bad in ("[1]", "{"):
        with fails("chat_template_kwargs_json"):
            chat_input.chat_template_kwargs(pb.ChatRequest(chat_template_kwargs_json=bad))
    for bad in ('{"chat_template": "{{ evil }}"}', '{"tools": []}', "[1]", "{"):
        request = chat("hi")
        request.chat_template_kwargs_json = bad
        assert routers(request) == (INVALID_ARGUMENT, "chat_template_kwargs_json")


def test_vllm_chat_request_carries_what_the_parsers_read() -> None:
    tool_dicts = chat_input.tools(pb.ChatRequest(tools=[weather()]))
    vreq = chat_input.vllm_chat_request(
        [{"role": "user", "content": "hi"}],
        tool_dicts,
        "required",
        {"enable_thinking": False},
        StructuredOutputsParams(regex="a+"),
    )
    assert vreq.tool_choice == "required"
    assert [t.function.name for t in vreq.tools or ()] == ["get_weather"]
    assert vreq.chat_template_kwargs == {"enable_thinking": False}
    assert vreq.structured_outputs == StructuredOutputsParams(regex="a+")
    assert vreq.stream


def test_vllm_chat_request_errors_name_the_field() -> None:
    user_hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(RequestError) as excinfo:
        chat_input.vllm_chat_request(user_hi, None, "required", {}, None)
    assert raised(excinfo) == (INVALID_ARGUMENT, "tool_choice")
    other = {"type": "function", "function": {"name": "other"}}
    with pytest.raises(RequestError) as excinfo:
        chat_input.vllm_chat_request(
            user_hi, chat_input.tools(pb.ChatRequest(tools=[weather()])), other, {}, None
        )
    assert raised(excinfo) == (INVALID_ARGUMENT, "tool_choice")


# ------------------------------------------------------------------ structured output


def test_structured_outputs() -> None:
    so = pb.StructuredOutput
    assert constraints.structured_outputs(so()) is None
    assert constraints.structured_outputs(so(json_object=False)) is None
    assert constraints.structured_outputs(so(json_schema=json.dumps(WEATHER_SCHEMA))) == (
        StructuredOutputsParams(json=WEATHER_SCHEMA)
    )
    assert constraints.structured_outputs(so(regex="a+")) == StructuredOutputsParams(regex="a+")
    assert constraints.structured_outputs(so(choice=pb.Choices(values=["y", "n"]))) == (
        StructuredOutputsParams(choice=["y", "n"])
    )
    assert constraints.structured_outputs(so(json_object=True)) == (
        StructuredOutputsParams(json_object=True)
    )


def test_structured_field() -> None:
    assert rules.structured_field(pb.StructuredOutput()) is None
    assert rules.structured_field(pb.StructuredOutput(regex="a")) == "structured_output.regex"
    assert rules.structured_field(pb.StructuredOutput(choice=pb.Choices(values=["a"]))) == (
        "structured_output.choice"
    )


UNPARSABLE_SCHEMAS = [
    (pb.StructuredOutput(json_schema="{"), "structured_output.json_schema"),
    (pb.StructuredOutput(json_schema="3"), "structured_output.json_schema"),
]
"""Constraints the conversion cannot parse."""


@pytest.mark.parametrize(("so", "field"), UNPARSABLE_SCHEMAS)
def test_bad_structured_outputs(so: pb.StructuredOutput, field: str) -> None:
    with pytest.raises(RequestError) as excinfo:
        constraints.structured_outputs(so)
    assert raised(excinfo) == (INVALID_ARGUMENT, field)


@pytest.mark.parametrize(
    ("so", "field"),
    [
        *UNPARSABLE_SCHEMAS,
        (pb.StructuredOutput(json_schema='{"type": "nope"}'), "structured_output.json_schema"),
        (pb.StructuredOutput(regex=""), "structured_output.regex"),
        (pb.StructuredOutput(choice=pb.Choices()), "structured_output.choice.values"),
        (
            pb.StructuredOutput(choice=pb.Choices(values=["y", ""])),
            "structured_output.choice.values",
        ),
    ],
)
def test_bad_structured_outputs_are_refused_by_the_router(
    so: pb.StructuredOutput, field: str
) -> None:
    request = pb.GenerateRequest(text="hi", structured_output=so)
    assert routers(request) == (INVALID_ARGUMENT, field)


# ------------------------------------------------------------------ sampling


def test_unset_fields_take_the_generation_config_then_vllm_defaults() -> None:
    params = sampling_params(pb.SamplingParams(), pb.StructuredOutput(), GEN_DEFAULTS, 100, 10)
    assert params.temperature == 0.6
    assert params.top_p == 0.95
    assert params.top_k == 20
    assert params.min_p == 0.0
    assert params.presence_penalty == 0.0
    assert params.repetition_penalty == 1.0
    assert params.n == 1
    assert params.max_tokens == 90  # the rest of the context
    assert params.seed is None
    assert params.logprobs is None
    assert params.output_kind == RequestOutputKind.DELTA
    assert params.skip_special_tokens
    assert params.structured_outputs is None


def test_explicit_fields() -> None:
    sampling = pb.SamplingParams(
        max_tokens=5,
        min_tokens=2,
        temperature=0.7,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        presence_penalty=1.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        stop=["END"],
        stop_token_ids=[7, 8],
        n=3,
        logprobs=True,
        top_logprobs=4,
        ignore_eos=True,
        seed=42,
        include_stop_str_in_output=True,
    )
    params = sampling_params(
        sampling,
        pb.StructuredOutput(regex="[ab]+"),
        GEN_DEFAULTS,
        100,
        10,
        skip_special_tokens=False,
    )
    assert (params.max_tokens, params.min_tokens) == (5, 2)
    assert params.temperature == 0.7  # not float32's 0.699999988
    assert (params.top_p, params.top_k, params.min_p) == (0.5, -1, 0.1)
    assert (params.presence_penalty, params.frequency_penalty) == (1.5, -0.5)
    assert params.repetition_penalty == 1.1
    assert params.stop == ["END"]
    assert params.stop_token_ids == [7, 8]
    assert params.n == 3
    assert params.logprobs == 4
    assert params.ignore_eos
    assert params.seed == 42
    assert params.include_stop_str_in_output
    assert not params.skip_special_tokens
    assert params.structured_outputs == StructuredOutputsParams(regex="[ab]+")


def test_logprobs_without_alternatives() -> None:
    params = sampling_params(pb.SamplingParams(logprobs=True), pb.StructuredOutput(), {}, 100, 1)
    assert params.logprobs == 0


def test_generation_config_stop_ids_and_max_tokens_are_merged() -> None:
    defaults = {"stop_token_ids": [9], "max_tokens": 20}
    params = sampling_params(
        pb.SamplingParams(stop_token_ids=[3]), pb.StructuredOutput(), defaults, 100, 10
    )
    assert params.stop_token_ids == [3, 9]
    assert params.max_tokens == 20


def test_max_tokens_must_fit_the_context() -> None:
    fits = sampling_params(pb.SamplingParams(max_tokens=90), pb.StructuredOutput(), {}, 100, 10)
    assert fits.max_tokens == 90
    with pytest.raises(RequestError) as excinfo:
        sampling_params(pb.SamplingParams(max_tokens=91), pb.StructuredOutput(), {}, 100, 10)
    assert raised(excinfo) == (INVALID_ARGUMENT, "sampling.max_tokens")
    with pytest.raises(RequestError) as excinfo:
        sampling_params(
            pb.SamplingParams(), pb.StructuredOutput(), {}, 100, 100, prompt_field="token_ids"
        )
    assert raised(excinfo) == (INVALID_ARGUMENT, "token_ids")
    unknown = sampling_params(pb.SamplingParams(), pb.StructuredOutput(), {}, 100, None)
    assert unknown.max_tokens is None


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (pb.SamplingParams(temperature=3.0), "sampling.temperature"),
        (pb.SamplingParams(top_p=0.0), "sampling.top_p"),
        (pb.SamplingParams(temperature=0.0, n=2), "sampling"),
        (pb.SamplingParams(min_tokens=9, max_tokens=3), "sampling"),
    ],
)
def test_vllm_validation_errors_become_request_errors(
    sampling: pb.SamplingParams, field: str
) -> None:
    with pytest.raises(RequestError) as excinfo:
        sampling_params(sampling, pb.StructuredOutput(), {}, 100, 1)
    assert raised(excinfo) == (INVALID_ARGUMENT, field)


def test_priority_high_runs_first() -> None:
    assert requests.priority(pb.PRIORITY_HIGH) == -1
    assert requests.priority(pb.PRIORITY_NORMAL) == 0
    assert requests.priority(pb.PRIORITY_UNSPECIFIED) == 0
    assert requests.priority(pb.PRIORITY_LOW) == 1
    ordered = [pb.PRIORITY_HIGH, pb.PRIORITY_NORMAL, pb.PRIORITY_LOW]
    assert sorted(ordered, key=requests.priority) == ordered


# ------------------------------------------------------------------ generate


def test_generate_prompt() -> None:
    assert requests.generate_prompt(pb.GenerateRequest(text="hi"), 10) == {"prompt": "hi"}
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 9]))
    assert requests.generate_prompt(ids, 10) == {"prompt_token_ids": [1, 9]}
    image = PILImage.new("RGB", (5, 4))
    with_image = requests.generate_prompt(pb.GenerateRequest(text="<img>"), 10, [image])
    assert with_image == {"prompt": "<img>", "multi_modal_data": {"image": [image]}}


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10])), "token_ids.ids[1]"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids"),
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(text=""), "text"),
    ],
)
def test_bad_generate_prompts(req: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(RequestError) as excinfo:
        requests.generate_prompt(req, 10)
    assert raised(excinfo) == (INVALID_ARGUMENT, field)
    if not field.startswith("token_ids.ids["):  # the vocabulary is the engine's
        assert routers(req) == (INVALID_ARGUMENT, field)
