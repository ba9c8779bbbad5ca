"""End to end: the HTTP API's errors, keys, admission, deadlines, cancellation, traces, metrics.

Every error class an OpenAI client can meet, through the official SDK (``max_retries=0``)
against real router processes on the session stack's Redis and worker.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from qwen_serve_dev import devstack
from tests.conftest import Stack
from tests.e2e.test_telemetry import scrape, value
from tests.openai_support import MODEL, NO_THINKING, HttpRouter, http_router, user
from tests.otlp_receiver import OtlpReceiver, one
from tests.security_support import KEYS, make_pki, tls, write_keys_file
from tests.support.calls import wait_engines_idle

pytestmark = pytest.mark.e2e

LONG: dict[str, Any] = {**NO_THINKING, "ignore_eos": True}
"""extra_body of a request that runs until its max_tokens."""


@dataclass
class Observed:
    """An HTTP router exporting traces to ``receiver`` and serving metrics."""

    router: HttpRouter
    receiver: OtlpReceiver
    metrics_port: int


@pytest.fixture(scope="module")
def observed(stack: Stack) -> Iterator[Observed]:
    """One traced HTTP router (OTLP to an in-process receiver, Prometheus metrics)."""
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        port = devstack.free_port()
        flags = ("--metrics-port", str(port))
        with http_router(stack, *flags, name="router-openai-traced", env=env) as router:
            yield Observed(router, receiver, port)


@pytest.fixture
async def client(observed: Observed) -> AsyncIterator[AsyncOpenAI]:
    """The official async client on the traced router, no retries."""
    async with AsyncOpenAI(base_url=observed.router.v1, api_key="x", max_retries=0) as c:
        yield c


async def chat(client: AsyncOpenAI, **kwargs: Any) -> Any:
    """A short greedy chat, thinking off, with ``kwargs`` on top."""
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": [user("Hi")],
        "max_tokens": 4,
        "temperature": 0,
        "extra_body": NO_THINKING,
    }
    return await client.chat.completions.create(**{**args, **kwargs})


def error_message(error: openai.APIError) -> str:
    """The ``message`` of the error body (the SDK's own message adds the status)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


# ------------------------------------------------------------------ 400 and 404


NOT_AN_IMAGE = "data:image/png;base64,bm90IGFuIGltYWdl"
BAD_TOOL = {"type": "function", "function": {"name": "a b"}}
NO_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x"}}
BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"top_p": 5}, "top_p", "must be in (0, 1]"),  # the router's validation
    ({"extra_body": {"bogus": 1}}, "bogus", "unrecognized"),  # the body's shape
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"seed": 7}, "seed", "seed"),  # found by the worker (CPU engine)
    ({"max_tokens": 4095, "messages": [user("Hi " * 20)]}, "max_tokens", "do not fit"),
    ({"messages": [user("Hi", NOT_AN_IMAGE)]}, "messages[0].content[0].image_url", "image"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "the call"),
    ({"tools": [BAD_TOOL]}, "tools[0].function.name", "characters"),
    ({"response_format": NO_SCHEMA}, "response_format.json_schema.schema", "schema"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
]


@pytest.mark.parametrize(("kwargs", "param", "words"), BAD_REQUESTS)
async def test_bad_requests_are_400_naming_the_argument(
    client: AsyncOpenAI, kwargs: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        await chat(client, **kwargs)
    error = failure.value
    assert error.status_code == 400 and error.param == param
    assert error.type == "invalid_request_error"
    message = error_message(error)
    assert message.startswith(f"{param}: ") and words in message
    assert error.response.headers["x-should-retry"] == "false"


async def test_bad_bodies_and_unknown_models(observed: Observed, client: AsyncOpenAI) -> None:
    async with httpx.AsyncClient(base_url=observed.router.base) as http:
        broken = await http.post("/v1/chat/completions", content=b"{not json")
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        several = await http.post("/v1/completions", json={"prompt": ["a", "b"]})
        assert several.json()["error"]["param"] == "prompt"
        wrong_method = await http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]
    with pytest.raises(openai.NotFoundError) as missing:
        await chat(client, model="gpt-4o")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4o")


# ------------------------------------------------------------------ 401, TLS


@pytest.fixture(scope="module")
def secure(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HttpRouter, Path]]:
    """An HTTP router with API keys and TLS (the gRPC port's settings)."""
    directory = tmp_path_factory.mktemp("openai-secure")
    pki = make_pki(directory)
    flags = (
        *("--api-keys-file", write_keys_file(directory / "keys")),
        *("--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key")),
    )
    with http_router(
        stack, *flags, name="router-openai-secure", scheme="https", credentials=tls(pki)
    ) as router:
        yield router, directory / "ca.crt"


async def test_api_keys_and_tls(secure: tuple[HttpRouter, Path]) -> None:
    router, ca = secure
    context = ssl.create_default_context(cafile=str(ca))

    def https(key: str) -> AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(verify=context)
        return AsyncOpenAI(base_url=router.v1, api_key=key, http_client=http, max_retries=0)

    async with https("qsk_not-a-key-0123456789") as c:
        with pytest.raises(openai.AuthenticationError) as failure:
            await chat(c)
        assert failure.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    async with https(KEYS["beta"]) as c:
        assert (await chat(c)).choices[0].finish_reason in ("length", "stop")
        assert [m.id for m in (await c.models.list()).data] == [MODEL]
    async with httpx.AsyncClient(verify=context) as http:
        anonymous = await http.post(router.v1 + "/chat/completions", json={"messages": []})
        assert anonymous.status_code == 401
        assert "authorization" in anonymous.json()["error"]["message"]
        assert (await http.get(router.base + "/health")).status_code == 200  # open by default


# ------------------------------------------------------------------ 429, 503, 504


async def test_a_full_router_answers_429_with_retry_after(stack: Stack) -> None:
    with http_router(stack, "--max-inflight", "1", name="router-openai-small") as router:
        async with AsyncOpenAI(base_url=router.v1, api_key="x", max_retries=0) as c:
            held = await chat(c, max_tokens=3000, stream=True, extra_body=LONG)
            await anext(aiter(held))  # streaming: the one slot is taken
            with pytest.raises(openai.RateLimitError) as failure:
                await chat(c)
            headers = failure.value.response.headers
            assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
            assert headers["x-should-retry"] == "true"
            assert failure.value.code == "rate_limit_exceeded"
            await held.close()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_no_worker_answers_503(stack: Stack) -> None:
    prefix = f"no-workers-{secrets.token_hex(3)}"
    with http_router(stack, name="router-openai-alone", prefix=prefix) as router:
        async with AsyncOpenAI(base_url=router.v1, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as failure:
                await chat(c)
            assert failure.value.status_code == 503 and "worker" in error_message(failure.value)
        async with httpx.AsyncClient() as http:
            assert (await http.get(router.base + "/health")).status_code == 503


async def test_deadline_header_ends_the_request(stack: Stack, client: AsyncOpenAI) -> None:
    timeout = {"X-Request-Timeout": "1.5"}
    with pytest.raises(openai.APIStatusError) as whole:
        await chat(client, max_tokens=3000, extra_body=LONG, extra_headers=timeout)
    assert whole.value.status_code == 504 and "deadline" in whole.value.message
    stream = await chat(
        client, max_tokens=3000, extra_body=LONG, stream=True, extra_headers=timeout
    )
    with pytest.raises(openai.APIError, match="deadline"):
        async for _chunk in stream:
            pass
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


# ------------------------------------------------------------------ cancellation


async def test_a_client_that_disconnects_frees_its_slot(stack: Stack, client: AsyncOpenAI) -> None:
    stream = await chat(client, max_tokens=3000, extra_body=LONG, stream=True)
    seen = 0
    async for _chunk in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0

    impatient = client.with_options(timeout=2.0)
    with pytest.raises(openai.APITimeoutError):
        await chat(impatient, max_tokens=3000, extra_body=LONG)
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


# ------------------------------------------------------------------ traces and metrics


async def test_traceparent_and_metrics_as_on_grpc(observed: Observed, client: AsyncOpenAI) -> None:
    before = scrape(observed.metrics_port)
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01"}
    answer = await chat(client, extra_headers=headers)
    with pytest.raises(openai.BadRequestError):
        await chat(client, top_p=5)
    trace = observed.receiver.wait_trace(trace_id, "POST /v1/chat/completions")
    server = one(trace, kind="SERVER")
    assert server.parent_id == client_span and not server.is_error
    trace = observed.receiver.wait_trace(trace_id, "POST /v1/chat/completions", "send qs-test:jobs")
    producer = one(trace, kind="PRODUCER")
    assert producer.parent_id == server.span_id
    assert server.attributes["gen_ai.response.id"] == answer.id.removeprefix("chatcmpl-")
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.usage.output_tokens"] == 4
    after = scrape(observed.metrics_port)
    method = "POST /v1/chat/completions"
    for code in ("OK", "INVALID_ARGUMENT"):
        name = "qwen_serve_requests_total"
        assert value(after, name, method=method, code=code) > value(
            before, name, method=method, code=code
        )
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_response_model": MODEL}
    assert value(after, ttft, **labels) > value(before, ttft, **labels)
