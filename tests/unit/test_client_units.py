"""qwen_serve_client without a server: request building, helpers, events, accumulation."""

from __future__ import annotations

import enum
import io
import json
from pathlib import Path
from typing import Annotated, Literal

import grpc
import pytest
from PIL import Image

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client import (
    Delta,
    Finished,
    FinishReason,
    RetryPolicy,
    Started,
    StreamError,
    ToolCall,
    ToolCallFragment,
    Usage,
    accumulate,
    chat_request,
    generate_request,
    image,
    tool_from_function,
    tool_result,
    user,
)
from qwen_serve_client.events import from_proto, to_dict
from qwen_serve_client.result import Accumulator
from qwen_serve_client.tools import tools_from_json
from tests.support.images import png


class Unit(enum.Enum):
    CELSIUS = "c"
    FAHRENHEIT = "f"


def get_weather(
    city: str,
    days: int = 1,
    unit: Unit = Unit.CELSIUS,
    detail: Literal["short", "long"] | None = None,
    tags: list[str] | None = None,
    note: Annotated[str, "free text for the forecaster"] = "",
) -> str:
    """Weather forecast for a city.

    Args:
        city: City name, e.g. "Paris".
        days: Days ahead,
            from 1 to 7.
    """
    return city


def test_tool_from_function_builds_a_json_schema() -> None:
    tool = tool_from_function(get_weather)
    schema = json.loads(tool.parameters_json_schema)
    assert tool.name == "get_weather"
    assert tool.description == "Weather forecast for a city."
    assert schema["required"] == ["city"]
    props = schema["properties"]
    assert props["city"] == {"type": "string", "description": 'City name, e.g. "Paris".'}
    assert props["days"] == {
        "type": "integer",
        "description": "Days ahead, from 1 to 7.",
        "default": 1,
    }
    assert props["unit"] == {"enum": ["c", "f"], "default": "c"}
    assert props["detail"] == {"enum": ["short", "long"]}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["note"] == {
        "type": "string",
        "description": "free text for the forecaster",
        "default": "",
    }


def test_tools_from_json_accepts_plain_and_openai_shapes() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    tools = tools_from_json(
        [
            {"name": "search", "description": "Search", "parameters": schema},
            {"type": "function", "function": {"name": "lookup", "parameters": schema}},
        ]
    )
    assert [t.name for t in tools] == ["search", "lookup"]
    assert json.loads(tools[1].parameters_json_schema) == schema
    with pytest.raises(ValueError, match="must match"):
        tools_from_json([{"name": "bad name"}])


def test_image_sources_become_the_same_image(tmp_path: Path) -> None:
    data = png(32)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    from_pil = image(Image.open(io.BytesIO(data)))
    assert (
        image(path) == image(str(path)) == image(data) == pb.Image(data=data, mime_type="image/png")
    )
    assert from_pil.mime_type == "image/png" and from_pil.data.startswith(b"\x89PNG")
    assert image("data:image/png;base64,AAAA").url.startswith("data:")
    with pytest.raises(ValueError, match="empty"):
        image(b"")


def test_chat_request_sets_only_what_was_given() -> None:
    request = chat_request(
        [user("Look", png(32))],
        think=False,
        max_tokens=16,
        temperature=0.0,
        stop=["END"],
        regex="a+",
        tool_choice="get_weather",
        priority="high",
        client_request_id="abc",
        chat_template_kwargs={"x": 1},
    )
    assert request.HasField("enable_thinking") and not request.enable_thinking
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.sampling.HasField("top_p")  # unset: the model's default
    assert list(request.sampling.stop) == ["END"]
    assert request.structured_output.regex == "a+"
    assert request.tool_choice.mode == pb.ToolChoice.MODE_FUNCTION
    assert request.tool_choice.function_name == "get_weather"
    assert request.priority == pb.PRIORITY_HIGH
    assert json.loads(request.chat_template_kwargs_json) == {"x": 1}
    assert request.messages[0].content[1].image.mime_type == "image/png"
    assert not chat_request("hi").HasField("enable_thinking")


def test_request_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at most one"):
        chat_request("hi", regex="a", json_object=True)
    with pytest.raises(TypeError, match="unknown"):
        chat_request("hi", max_token=3)  # type: ignore[call-arg]
    assert generate_request([1, 2, 3]).token_ids.ids == [1, 2, 3]
    assert generate_request("p", json_schema={"type": "object"}).structured_output.json_schema


def test_tool_result_and_assistant_message_round_trip() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    assert call.arguments == {"city": "Paris"}
    message = tool_result(call, {"sky": "sunny"})
    assert message.role == pb.ROLE_TOOL and message.tool_call_id == "call_1"
    assert json.loads(message.content[0].text) == {"sky": "sunny"}
    assert tool_result("call_2", "done").content[0].text == "done"


def test_accumulate_folds_deltas_finished_and_usage() -> None:
    events = [
        Started("req_1", "", "m"),
        Delta(0, reasoning="hm"),
        Delta(0, content="Hi", token_ids=(1,)),
        Delta(0, tool_calls=(ToolCallFragment(0, "c1", "f", '{"a":'),), token_ids=(2,)),
        Delta(0, tool_calls=(ToolCallFragment(0, "", "", " 1}"),)),
        Finished(0, FinishReason.TOOL_CALLS, tool_calls=(ToolCall("c1", "f", '{"a": 1}'),)),
        Usage(5, 2),
    ]
    acc = Accumulator()
    for event in events:
        acc.add(event)
    assert acc.partial_tool_calls() == [ToolCall("c1", "f", '{"a": 1}')]
    result = accumulate(events)
    assert (result.request_id, result.reasoning, result.content) == ("req_1", "hm", "Hi")
    assert result.finish_reason == FinishReason.TOOL_CALLS
    assert result.choice().token_ids == [1, 2]
    message = result.message()
    assert message.role == pb.ROLE_ASSISTANT and message.tool_calls[0].name == "f"
    assert result.raise_for_error() is result


def test_error_event_is_typed_and_raised_on_demand() -> None:
    event = from_proto(pb.ChatEvent(error=pb.Error(code=14, message="worker lost", retryable=True)))
    assert isinstance(event, StreamError)
    assert event.status == grpc.StatusCode.UNAVAILABLE
    assert to_dict(event) == {
        "type": "error",
        "code": 14,
        "message": "worker lost",
        "retryable": True,
        "field": "",
        "status": "UNAVAILABLE",
    }
    result = accumulate([Started("req_1", "", "m"), event])
    with pytest.raises(Exception, match="worker lost") as info:
        result.raise_for_error()
    assert info.value.retryable  # type: ignore[attr-defined]
    bad = pb.Error(code=3, message="images[0]: not an image", field="images[0]")
    typed = from_proto(pb.ChatEvent(error=bad))
    assert isinstance(typed, StreamError) and typed.field == "images[0]"
    with pytest.raises(Exception, match="not an image") as info:
        accumulate([Started("req_2", "", "m"), typed]).raise_for_error()
    assert info.value.field == "images[0]"  # type: ignore[attr-defined]


def test_retry_policy_honours_the_server_hint_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=2.0)
    assert policy.delay(1, hint=0.5) == 0.5
    assert policy.delay(1, hint=60.0) == 2.0
    assert 0.08 <= policy.delay(1) <= 0.12
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 2)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 3)
    assert not policy.should_retry(grpc.StatusCode.INVALID_ARGUMENT, 1)
