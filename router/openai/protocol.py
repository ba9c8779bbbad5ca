"""Request bodies of the OpenAI-compatible API: shapes and types only.

The models say which arguments exist and what JSON type each has (and, for
integers, the range of the protobuf field that carries it). They hold no rule
about values: ranges, roles, tools, images and limits are checked once, on the
protobuf request, by ``router/validation.py`` and the worker, as for gRPC.

An argument this API does not know is refused, as OpenAI's own API refuses it,
so nothing a client sends is silently dropped.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_serve.errors import invalid

UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ImageURL(_Body):
    """``image_url`` of a content part: a ``data:`` URL, or an allowed http(s) URL."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Body):
    """A text or image part of a message."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_Body):
    """The function of an earlier tool call."""

    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    """A tool call of an earlier assistant turn."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    """One turn of the conversation (``developer`` is read as ``system``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(_Body):
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """A tool: always a function."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    """The function a named tool choice forces."""

    name: str


class NamedToolChoice(_Body):
    """``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: FunctionName


class JsonSchema(_Body):
    """``response_format.json_schema``."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` extension (one of json, regex, choice, json_object)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


class StreamOptions(_Body):
    """``stream_options``."""

    include_usage: bool | None = None


class _Common(_Body):
    """Arguments both endpoints take: sampling, streaming and vLLM's extensions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: UInt32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[UInt32] | None = None
    n: UInt32 | None = None
    seed: Int64 | None = None
    min_tokens: UInt32 | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Literal["low", "normal", "high"] | None = None
    return_token_ids: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: UInt32 | None = None
    logprobs: bool = False
    top_logprobs: UInt32 | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[UInt32] | list[str] | list[list[UInt32]]
    logprobs: UInt32 | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: UInt32 | None = None


_TYPE_STEP = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)$")
"""Steps pydantic adds to an error's location for union members (``str``, ``list[...]``)."""


def path(loc: tuple[int | str, ...]) -> str:
    """An error location as a field path: ``messages[0].content[1].image_url``."""
    out = ""
    for step in loc:
        if isinstance(step, int):
            out += f"[{step}]"
        elif not _TYPE_STEP.match(step):
            out += f".{step}" if out else step
    return out


def _describe(error: Any) -> tuple[str, str]:
    where = path(error["loc"])
    if error["type"] == "extra_forbidden":
        return where, "unrecognized request argument"
    message = str(error["msg"])
    return where, message[:1].lower() + message[1:]


def parse(model: type[M], body: bytes) -> M:
    """``body`` as ``model``; RequestError(INVALID_ARGUMENT) naming the argument otherwise.

    Of several errors (a union reports one per member) the deepest is reported.
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        raise invalid("", f"the body is not valid JSON: {errors[0]['msg']}") from None
    described = [_describe(e) for e in errors]
    deepest = max(len(e["loc"]) for e in errors)
    where = next(_describe(e)[0] for e in errors if len(e["loc"]) == deepest)
    if not where:
        raise invalid("", "the body must be a JSON object") from None
    messages = dict.fromkeys(m for w, m in described if w == where)
    raise invalid(where, " or ".join(messages)) from None
