"""End to end through the OpenAI-compatible HTTP API with the official ``openai`` SDK.

openai SDK → HTTP → router (``--http-listen``) → Redis → worker → vLLM CPU engine with
the tiny model. Where a test needs a given output (a tool call, an answer), vLLM's
structured outputs spell it, as in tests/e2e/test_e2e_features.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI

from tests.conftest import Stack
from tests.openai_support import (
    CALL_MARKUP,
    MODEL,
    NO_THINKING,
    WEATHER,
    HttpRouter,
    http_router,
    spelled,
    user,
)
from tests.support.images import png_data_url

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def router(stack: Stack) -> Iterator[HttpRouter]:
    """One HTTP router for the module."""
    with http_router(stack, name="router-openai") as r:
        yield r


@pytest.fixture
async def client(router: HttpRouter) -> AsyncIterator[AsyncOpenAI]:
    """The official async client, no retries."""
    async with AsyncOpenAI(base_url=router.v1, api_key="unused", max_retries=0) as c:
        yield c


async def chunks_of(stream: Any) -> list[Any]:
    """Every chunk of a streamed response."""
    return [chunk async for chunk in stream]


# ------------------------------------------------------------------ chat


async def test_chat_whole(client: AsyncOpenAI) -> None:
    extra = {**NO_THINKING, "ignore_eos": True, "return_token_ids": True}
    r = await client.chat.completions.create(
        model=MODEL, messages=[user("Hello")], max_tokens=8, temperature=0, extra_body=extra
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-req_")
    assert r.model == MODEL
    (choice,) = r.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert len((choice.model_extra or {})["token_ids"]) == 8
    assert r.usage is not None
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


async def test_chat_streamed_with_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, user("Hello")],
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**NO_THINKING, "ignore_eos": True, "return_token_ids": True},
    )
    chunks = await chunks_of(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    token_ids = [
        t
        for c in chunks
        if c.choices
        for t in (c.choices[0].model_extra or {}).get("token_ids", [])
    ]
    assert len(token_ids) == 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_tool_call_with_an_image(client: AsyncOpenAI) -> None:
    messages = [user("Weather in the city on this photo?", png_data_url())]
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "tools": [WEATHER],
        "max_tokens": 80,
        "temperature": 0,
        "extra_body": spelled(CALL_MARKUP),
    }
    whole = await client.chat.completions.create(**kwargs)
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert whole.usage is not None and whole.usage.prompt_tokens > 100  # the image's tokens

    chunks = await chunks_of(await client.chat.completions.create(**kwargs, stream=True))
    fragments = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert fragments[0].id and fragments[0].type == "function"
    assert fragments[0].function and fragments[0].function.name == "get_weather"
    assert {f.index for f in fragments} == {0}
    arguments = "".join((f.function.arguments or "") for f in fragments if f.function)
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_result_round_trips(client: AsyncOpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        user("Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    r = await client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=20,
        temperature=0,
        extra_body=spelled("It is sunny."),
    )
    assert r.choices[0].message.content == "It is sunny."
    assert r.choices[0].finish_reason == "stop"


async def test_reasoning_on_and_off(client: AsyncOpenAI) -> None:
    base: dict[str, Any] = {
        "model": MODEL,
        "messages": [user("Think.")],
        "max_tokens": 8,
        "temperature": 0,
    }
    on = await client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    message = on.choices[0].message.model_extra or {}
    # The random model never closes its reasoning: all 8 tokens are reasoning.
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert on.choices[0].message.content == ""
    assert on.usage and on.usage.completion_tokens_details
    assert on.usage.completion_tokens_details.reasoning_tokens == 8

    off = await client.chat.completions.create(
        **base, extra_body={**NO_THINKING, "ignore_eos": True}
    )
    assert (off.choices[0].message.model_extra or {}).get("reasoning_content") is None
    assert off.usage and off.usage.completion_tokens_details
    assert off.usage.completion_tokens_details.reasoning_tokens == 0

    chunks = await chunks_of(await client.chat.completions.create(**base, stream=True))
    streamed = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
    )
    assert streamed and not any(c.choices[0].delta.content for c in chunks)


async def test_json_schema_response_format(client: AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[user("A person, please.")],
        max_tokens=60,
        frequency_penalty=2.0,  # keeps the random model off whitespace
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        extra_body=NO_THINKING,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


async def test_choices_logprobs_and_stop(client: AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model=MODEL,
        messages=[user("Hi")],
        n=2,
        max_tokens=4,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
        extra_body={**NO_THINKING, "ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.logprobs and choice.logprobs.content and len(choice.logprobs.content) == 4
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.bytes == list(entry.token.encode())
    assert r.usage and r.usage.completion_tokens == 8

    stop = await client.chat.completions.create(
        model=MODEL,
        messages=[user("Hi")],
        max_tokens=20,
        stop=["beta"],
        extra_body=spelled("alpha beta gamma"),
    )
    assert stop.choices[0].message.content == "alpha "
    assert stop.choices[0].finish_reason == "stop"
    assert (stop.choices[0].model_extra or {})["stop_reason"] == "beta"


# ------------------------------------------------------------------ completions


async def test_completions_with_text_and_token_ids(client: AsyncOpenAI) -> None:
    text = await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert text.object == "text_completion" and text.id.startswith("cmpl-req_")
    assert text.usage and text.usage.completion_tokens == 5
    assert isinstance(text.choices[0].text, str) and text.choices[0].finish_reason == "length"

    ids = await client.completions.create(
        model=MODEL, prompt=[10, 20, 30, 40], extra_body={"ignore_eos": True}
    )
    assert ids.usage and ids.usage.prompt_tokens == 4
    assert ids.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions

    stream = await client.completions.create(
        model=MODEL,
        prompt=[10, 20, 30, 40],
        max_tokens=5,
        logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = await chunks_of(stream)
    logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    tokens = [t for lp in logprobs for t in lp.tokens or []]
    assert len(tokens) == 5
    assert all(len(top) <= 2 for lp in logprobs for top in lp.top_logprobs or [])
    offsets = [o for lp in logprobs for o in lp.text_offset or []]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 5


# ------------------------------------------------------------------ models and health


async def test_models_and_health(client: AsyncOpenAI, router: HttpRouter) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    async with httpx.AsyncClient(base_url=router.base) as http:
        assert (await http.get("/health")).json() == {"status": "SERVING"}
        assert (await http.get("/health/live")).status_code == 200
        missing = await http.get("/v2/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["message"]
