"""Request checks done by the router before a job is queued: every rule that needs no engine.

Each check raises :class:`RequestError` naming the offending field, so a client
learns exactly what to fix; the fields, limits and wording are those of
``qwen_serve.request_rules``, which the worker uses too. Checks that need the
model's limits take a ``ModelInfo``; what needs the engine itself (token counts,
token ids against the vocabulary, decoded images) is checked by the worker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jsonschema
from google.protobuf.message import Message

from qwen_serve import jsontext, regexes, schemas
from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid
from qwen_serve.image_types import unsupported


def check_chat(req: pb.ChatRequest) -> None:
    """Checks of a ChatRequest that need no model limits."""
    _check_client_id(req.client_request_id)
    if not req.messages:
        raise rules.no_messages()
    for i, message in enumerate(req.messages):
        _check_message(message, rules.message_field(i))
    _check_tools(req.tools, req.tool_choice)
    _check_template_kwargs(req.chat_template_kwargs_json)
    _check_structured(req.structured_output)
    _check_sampling(req.sampling)
    _check_no_placeholders(req)


def check_generate(req: pb.GenerateRequest) -> None:
    """Checks of a GenerateRequest that need no model limits."""
    _check_client_id(req.client_request_id)
    rules.check_prompt(req)
    for i, image in enumerate(req.images):
        _check_image(image, rules.generate_image_field(i))
    _check_structured(req.structured_output)
    _check_sampling(req.sampling)


def check_against_model(
    model: str,
    sampling: pb.SamplingParams,
    images: int,
    info: pb.ModelInfo,
    images_field: str = rules.MESSAGES,
) -> None:
    """Checks against the served model's name and limits (``images_field`` holds the images)."""
    if model and model not in (info.served_model_name, info.model_path):
        raise rules.model_not_served(model, info.served_model_name)
    if sampling.HasField("max_tokens") and sampling.max_tokens >= info.max_context_tokens:
        raise rules.max_tokens_fill_context(sampling.max_tokens, info.max_context_tokens)
    rules.check_image_count(images, info.max_images_per_prompt or None, images_field)


def count_images(messages: Sequence[pb.Message]) -> int:
    """Image parts over all messages."""
    return sum(1 for m in messages for part in m.content if part.HasField("image"))


def check_request_id(request_id: str) -> None:
    """A server-assigned request id as given to Abort."""
    if not rules.REQUEST_ID_RE.fullmatch(request_id):
        raise rules.bad_request_id()


def _check_client_id(client_id: str) -> None:
    if client_id and not rules.CLIENT_ID_RE.fullmatch(client_id):
        raise rules.bad_client_id()


# ------------------------------------------------------------------ messages


def _check_message(message: pb.Message, where: str) -> None:
    role = rules.role_name(message.role, where)
    has_text = any(p.HasField("text") and p.text for p in message.content)
    has_image = any(p.HasField("image") for p in message.content)
    if not (has_text or has_image or message.tool_calls):
        raise rules.empty(f"{where}.content")
    for j, part in enumerate(message.content):
        _check_part(part, where, j, role)
    if message.tool_calls and role != "assistant":
        raise rules.assistant_only(where, "tool_calls", "tool calls")
    if message.reasoning and role != "assistant":
        raise rules.assistant_only(where, "reasoning", "reasoning")
    for k, call in enumerate(message.tool_calls):
        field = rules.tool_call_field(where, k)
        if not call.name:
            raise rules.empty(f"{field}.name")
        if call.arguments_json:
            jsontext.load_object(call.arguments_json, f"{field}.arguments_json")
    if role == "tool" and not message.tool_call_id:
        raise rules.no_tool_call_id(where)


def _check_part(part: pb.ContentPart, message: str, j: int, role: str) -> None:
    if part.WhichOneof("part") is None:
        raise rules.empty_part(rules.part_field(message, j))
    if part.HasField("image"):
        where = rules.image_part_field(message, j)
        if role != "user":
            raise rules.image_outside_user(where)
        _check_image(part.image, where)


def _check_image(image: pb.Image, where: str) -> None:
    """Source, data: URL form and declared types; the bytes are the worker's to check."""
    source = rules.image_source(image, where)
    _check_mime(image.mime_type, where)
    if source == "data_url":
        _check_mime(rules.split_data_url(image.url, f"{where}.url")[0], where)


def _check_mime(mime: str, where: str) -> None:
    problem = unsupported(mime)
    if problem:
        raise invalid(where, problem)


def _strings(message: Message, prefix: str) -> Iterator[tuple[str, str]]:
    """(field path, value) of every set string field of ``message``, depth first."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        values = value if field.is_repeated else [value]
        for index, item in enumerate(values):
            where = f"{path}[{index}]" if field.is_repeated else path
            if isinstance(item, str):
                yield where, item
            elif isinstance(item, Message):
                yield from _strings(item, f"{where}.")


def _check_no_placeholders(req: pb.ChatRequest) -> None:
    """No text of a chat may spell a media placeholder: image parts bring their own."""
    for where, text in _strings(req, ""):
        for token in rules.PLACEHOLDERS:
            if token in text:
                raise rules.placeholder_in_text(where, token)


# ------------------------------------------------------------------ tools and JSON


def _check_tools(tools: Sequence[pb.Tool], choice: pb.ToolChoice) -> None:
    names = set()
    for j, tool in enumerate(tools):
        if not rules.TOOL_NAME_RE.fullmatch(tool.name):
            raise rules.bad_tool_name(j)
        if tool.name in names:
            raise rules.duplicate_tool(j, tool.name)
        names.add(tool.name)
        _check_schema(rules.tool_schema(tool, j), rules.tool_field(j, "parameters_json_schema"))
    _check_tool_choice(choice, names)


def _check_tool_choice(choice: pb.ToolChoice, names: set[str]) -> None:
    mode = pb.ToolChoice
    if choice.mode not in mode.Mode.values():
        raise rules.unknown_tool_choice(choice.mode)
    if choice.mode == mode.MODE_FUNCTION and choice.function_name not in names:
        raise rules.unknown_tool_choice_function()
    if choice.mode == mode.MODE_REQUIRED and not names:
        raise rules.tool_choice_needs_tools(rules.TOOL_CHOICE, "REQUIRED")
    if choice.mode == mode.MODE_AUTO and not names:
        raise rules.tool_choice_needs_tools(rules.TOOL_CHOICE_MODE, "AUTO")


def _check_schema(schema: Any, where: str) -> None:
    """A JSON Schema some value can match, well-formed for its declared draft."""
    reason = schemas.unsatisfiable(schema)
    if reason:
        raise rules.schema_unsatisfiable(where, reason)
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    if declared is not None and not isinstance(declared, str):
        raise rules.schema_uri_not_string(where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise rules.schema_invalid(where, exc.message) from None


def _check_template_kwargs(text: str) -> None:
    kwargs = jsontext.load_object(text or "{}", rules.TEMPLATE_KWARGS)
    reserved = sorted(rules.RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise rules.reserved_template_kwargs(reserved)
    for name in sorted(rules.BOOLEAN_TEMPLATE_KWARGS & kwargs.keys()):
        if not isinstance(kwargs[name], bool):
            raise rules.template_switch_not_boolean(name)


def _check_structured(structured: pb.StructuredOutput) -> None:
    where = rules.structured_field(structured)
    kind = structured.WhichOneof("kind")
    if where is None or kind == "json_object":
        return
    if kind == "choice":
        values = structured.choice.values
        if not values or not all(values):
            raise rules.bad_choices(f"{where}.values")
        return
    text = structured.json_schema if kind == "json_schema" else structured.regex
    if not text:
        raise rules.empty(where)
    if kind == "json_schema":
        _check_schema(jsontext.load_object(text, where), where)
    else:
        _check_regex(text, where)


def _check_regex(regex: str, where: str) -> None:
    try:
        re.compile(regex)
    except (re.error, OverflowError) as exc:
        raise rules.bad_regex(where, str(exc)) from None
    except RecursionError:
        raise rules.regex_too_deep(where) from None
    reason = regexes.unsatisfiable(regex)
    if reason:
        raise rules.regex_unsatisfiable(where, reason)


# ------------------------------------------------------------------ sampling


FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _check_sampling(s: pb.SamplingParams) -> None:
    for name in FLOAT_FIELDS:
        if s.HasField(name) and not math.isfinite(getattr(s, name)):
            raise rules.not_finite(name)
    _range(s, "max_tokens", 1, None)
    _range(s, "temperature", 0.0, None)
    _range(s, "min_p", 0.0, 1.0)
    _range(s, "presence_penalty", -2.0, 2.0)
    _range(s, "frequency_penalty", -2.0, 2.0)
    _range(s, "n", 1, rules.MAX_N)
    _range(s, "top_logprobs", 0, rules.MAX_TOP_LOGPROBS)
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        raise rules.sampling_rule("top_p", "must be in (0, 1]")
    if s.HasField("repetition_penalty") and s.repetition_penalty <= 0:
        raise rules.sampling_rule("repetition_penalty", "must be > 0")
    if s.HasField("top_k") and s.top_k < -1:
        raise rules.sampling_rule("top_k", "must be -1, 0 or positive")
    if s.HasField("min_tokens") and s.HasField("max_tokens") and s.min_tokens > s.max_tokens:
        raise rules.sampling_rule("min_tokens", "must not exceed max_tokens")
    if len(s.stop) > rules.MAX_STOP or any(not stop for stop in s.stop):
        raise rules.bad_stop()


def _range(s: pb.SamplingParams, name: str, low: float, high: float | None) -> None:
    if not s.HasField(name):
        return
    value = getattr(s, name)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise rules.out_of_range(name, value, bound)
