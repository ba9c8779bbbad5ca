"""The HTTP API's pure parts: body parsing, conversion, field names, chunks, error bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, RequestError
from router import validation
from router.openai import chunks, convert, errors
from router.openai import protocol as p
from router.openai.folded import Folded
from router.openai.server import split_listen


def chat_body(**fields: Any) -> p.ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Hi"}], **fields}
    return p.parse(p.ChatCompletionRequest, json.dumps(body).encode())


AUDIO_PART = b'{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}'
IMAGE_URL = "data:image/png;base64,AAAA"
"""A data: URL of the right form (its bytes are the worker's to decode)."""
JSON_SCHEMA_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}


def refusal(call: Any) -> RequestError:
    with pytest.raises(RequestError) as failure:
        call()
    return failure.value


# ------------------------------------------------------------------ parsing and conversion


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"messages": [], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "bot"}]}', "messages[0].role"),
        (AUDIO_PART, "messages[0].content[0].type"),
        (b'{"messages": [], "functions": []}', "functions"),
        (b'{"messages": [], "n": -1}', "n"),
        (b"[]", ""),
        (b"{", ""),
    ],
)
def test_bodies_are_parsed_with_the_argument_named(raw: bytes, field: str) -> None:
    error = refusal(lambda: p.parse(p.ChatCompletionRequest, raw))
    assert error.code == INVALID_ARGUMENT and error.field == field


def test_a_chat_body_becomes_the_grpc_request() -> None:
    body = chat_body(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}]},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "hmm",
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        max_completion_tokens=7,
        stop="END",
        priority="high",
        response_format={"type": "json_object"},
        chat_template_kwargs={"enable_thinking": False},
    )
    request = convert.chat_request(body, "abc").request
    assert isinstance(request, pb.ChatRequest)
    validation.check_chat(request)  # the gRPC path's own checks accept it
    roles = [m.role for m in request.messages]
    assert roles == [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL]
    assert request.messages[1].content[0].image.url == IMAGE_URL
    assert request.messages[2].reasoning == "hmm"
    assert request.messages[2].tool_calls[0].name == "f"
    assert json.loads(request.tools[0].parameters_json_schema) == {"type": "object"}
    assert request.tool_choice.mode == pb.ToolChoice.MODE_FUNCTION
    assert request.sampling.max_tokens == 7 and list(request.sampling.stop) == ["END"]
    assert request.priority == pb.PRIORITY_HIGH and request.structured_output.json_object
    assert json.loads(request.chat_template_kwargs_json) == {"enable_thinking": False}
    assert request.client_request_id == "abc"


def test_unset_sampling_stays_unset() -> None:
    sampling = convert.chat_request(chat_body()).request.sampling
    assert not any(sampling.HasField(name) for name in convert.SAMPLING)


@pytest.mark.parametrize(
    ("pb_field", "fields", "param"),
    [
        ("sampling.top_p", {}, "top_p"),
        ("sampling.max_tokens", {"max_completion_tokens": 3}, "max_completion_tokens"),
        ("sampling.max_tokens", {"max_tokens": 3}, "max_tokens"),
        ("messages[2].content[1].image", {}, "messages[2].content[1].image_url"),
        (
            "messages[0].tool_calls[1].arguments_json",
            {},
            "messages[0].tool_calls[1].function.arguments",
        ),
        ("tools[0].parameters_json_schema", {}, "tools[0].function.parameters"),
        ("tool_choice.function_name", {}, "tool_choice.function.name"),
        ("chat_template_kwargs_json", {}, "chat_template_kwargs"),
        ("structured_output.json_schema", JSON_SCHEMA_FORMAT, "response_format.json_schema.schema"),
        (
            "structured_output.regex",
            {"structured_outputs": {"regex": "x"}},
            "structured_outputs.regex",
        ),
        ("client_request_id", {}, "X-Request-Id"),
        ("messages", {}, "messages"),
    ],
)
def test_grpc_field_names_become_argument_names(
    pb_field: str, fields: dict[str, Any], param: str
) -> None:
    assert convert.chat_request(chat_body(**fields)).param(pb_field) == param


def test_completion_prompts_and_defaults() -> None:
    def completion(**fields: Any) -> convert.Converted:
        body = p.parse(p.CompletionRequest, json.dumps(fields).encode())
        return convert.completion_request(body)

    text = completion(prompt="Once").request
    assert isinstance(text, pb.GenerateRequest)
    assert text.text == "Once" and text.sampling.max_tokens == convert.COMPLETIONS_MAX_TOKENS
    ids = completion(prompt=[[1, 2, 3]], logprobs=0, max_tokens=2)
    assert isinstance(ids.request, pb.GenerateRequest)
    assert list(ids.request.token_ids.ids) == [1, 2, 3]
    assert ids.request.sampling.logprobs and ids.request.sampling.top_logprobs == 0
    assert ids.param("token_ids.ids[2]") == "prompt[2]"
    assert ids.param("sampling.top_logprobs") == "logprobs"
    for fields, field in (
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": "a", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"prompt": "a", "structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
        ),
    ):
        assert refusal(lambda f=fields: completion(**f)).field == field  # type: ignore[misc]


# ------------------------------------------------------------------ chunks


def envelope(token_ids: bool = False) -> chunks.Envelope:
    return chunks.Envelope("chat.completion", "req_x", "m", token_ids)


def delta(**fields: Any) -> pb.ChatEvent:
    return pb.ChatEvent(delta=pb.Delta(**fields))


def test_chat_stream_chunks() -> None:
    stream = chunks.ChatStream(envelope(), logprobs=False, include_usage=True)
    assert stream.chunks(pb.ChatEvent(started=pb.Started(request_id="req_x"))) == []
    assert stream.chunks(delta(token_ids=[5])) == []  # markup the parser consumed
    (first,) = stream.chunks(delta(reasoning="r", token_ids=[1]))
    assert first["id"] == "chatcmpl-req_x" and first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {
        "role": "assistant",
        "reasoning": "r",
        "reasoning_content": "r",
    }
    fragments = [
        pb.ToolCallDelta(index=0, id="call_a", name="f", arguments_fragment='{"a"'),
        pb.ToolCallDelta(index=0, arguments_fragment=": 1"),
    ]
    (calls,) = stream.chunks(delta(tool_calls=fragments))
    (entry,) = calls["choices"][0]["delta"]["tool_calls"]  # merged: one entry per call
    assert entry == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1'},
    }
    whole = [pb.ToolCall(id="call_a", name="f", arguments_json='{"a": 1}')]
    finished = pb.ChatEvent(
        finished=pb.Finished(reason=pb.FINISH_REASON_TOOL_CALLS, tool_calls=whole)
    )
    rest, last = stream.chunks(finished)  # the unstreamed end of the arguments first
    assert rest["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": "}"}}
    ]
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    (usage,) = stream.chunks(pb.ChatEvent(usage=pb.Usage(prompt_tokens=3, completion_tokens=4)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7


def test_folded_chat_and_completion() -> None:
    folded = Folded(envelope(token_ids=True), logprobs=True)
    top = [pb.TopLogprob(token="b", logprob=-2.0)]
    folded.add(
        delta(
            content="a",
            token_ids=[1],
            logprobs=[pb.TokenLogprob(token="a", logprob=float("-inf"), top=top)],
        )
    )
    folded.add(pb.ChatEvent(finished=pb.Finished(reason=pb.FINISH_REASON_STOP, matched_stop="x")))
    folded.add(pb.ChatEvent(usage=pb.Usage(prompt_tokens=1, completion_tokens=1)))
    (choice,) = folded.chat()["choices"]
    assert choice["message"]["content"] == "a" and choice["token_ids"] == [1]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "x"
    assert choice["logprobs"]["content"][0]["logprob"] == chunks.MIN_LOGPROB
    legacy = folded.completion()["choices"][0]["logprobs"]
    assert legacy == {
        "tokens": ["a"],
        "token_logprobs": [chunks.MIN_LOGPROB],
        "top_logprobs": [{"b": -2.0}],
        "text_offset": [0],
    }


# ------------------------------------------------------------------ errors and settings


def test_error_bodies_and_retry_headers() -> None:
    busy = RequestError(RESOURCE_EXHAUSTED, "", "full", retryable=True, retry_after_ms=1500)
    assert errors.http_status(busy.code) == 429
    assert errors.headers(busy) == {
        "x-should-retry": "true",
        "Retry-After": "2",
        "retry-after-ms": "1500",
    }
    missing = errors.body(RequestError(NOT_FOUND, "model", "'x' is not served here"))
    assert missing["error"]["code"] == "model_not_found" and missing["error"]["param"] == "model"
    bad = errors.body(
        RequestError(INVALID_ARGUMENT, "sampling.top_p", "must be in (0, 1]"), lambda f: "top_p"
    )
    assert bad["error"]["message"] == "top_p: must be in (0, 1]"
    assert bad["error"]["type"] == "invalid_request_error"
    assert errors.http_status(99) == 500


def test_listen_addresses() -> None:
    assert split_listen("[::]:8000") == (None, 8000)
    assert split_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_listen("8000")
