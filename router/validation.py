"""Request checks done by the router before a job is queued.

Each check raises :class:`RequestError` naming the offending field, so a
client learns exactly what to fix. Checks that need the model's limits take
a ``ModelInfo``; the prompt's token length is checked by the worker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from qwen_serve import jsontext, regexes, schemas
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import NOT_FOUND, RequestError, invalid
from qwen_serve.image_types import unsupported

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_N = 8
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


def check_chat(req: pb.ChatRequest) -> None:
    """Checks of a ChatRequest that need no model limits."""
    _check_client_id(req.client_request_id)
    if not req.messages:
        raise invalid("messages", "at least one message is required")
    for i, message in enumerate(req.messages):
        _check_message(message, f"messages[{i}]")
    _check_tools(req.tools, req.tool_choice)
    _check_json_object(req.chat_template_kwargs_json, "chat_template_kwargs_json")
    _check_structured(req.structured_output)
    _check_sampling(req.sampling)


def check_generate(req: pb.GenerateRequest) -> None:
    """Checks of a GenerateRequest that need no model limits."""
    _check_client_id(req.client_request_id)
    kind = req.WhichOneof("prompt")
    if kind is None or (kind == "text" and not req.text):
        raise invalid("text", "a prompt (text or token_ids) is required")
    if kind == "token_ids" and not req.token_ids.ids:
        raise invalid("token_ids.ids", "must not be empty")
    for i, image in enumerate(req.images):
        _check_image(image, f"images[{i}]")
    _check_structured(req.structured_output)
    _check_sampling(req.sampling)


def check_against_model(
    model: str,
    sampling: pb.SamplingParams,
    images: int,
    info: pb.ModelInfo,
    images_field: str = "messages",
) -> None:
    """Checks against the served model's name and limits (``images_field`` holds the images)."""
    if model and model not in (info.served_model_name, info.model_path):
        raise RequestError(
            NOT_FOUND, "model", f"{model!r} is not served here; use {info.served_model_name!r}"
        )
    if sampling.HasField("max_tokens") and sampling.max_tokens >= info.max_context_tokens:
        raise invalid(
            "sampling.max_tokens",
            f"{sampling.max_tokens} leaves no room for the prompt in a context of "
            f"{info.max_context_tokens} tokens",
        )
    if info.max_images_per_prompt and images > info.max_images_per_prompt:
        raise invalid(
            images_field, f"{images} images; at most {info.max_images_per_prompt} per prompt"
        )


def count_images(messages: Sequence[pb.Message]) -> int:
    """Image parts over all messages."""
    return sum(1 for m in messages for part in m.content if part.HasField("image"))


def check_request_id(request_id: str) -> None:
    """A server-assigned request id as given to Abort."""
    if not REQUEST_ID_RE.fullmatch(request_id):
        raise invalid("request_id", "not a request id issued by this service")


def _check_client_id(client_id: str) -> None:
    if client_id and not CLIENT_ID_RE.fullmatch(client_id):
        raise invalid("client_request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")


def _check_message(message: pb.Message, where: str) -> None:
    if message.role == pb.ROLE_UNSPECIFIED or message.role not in pb.Role.values():
        raise invalid(f"{where}.role", "must be SYSTEM, USER, ASSISTANT or TOOL")
    has_text = any(p.HasField("text") and p.text for p in message.content)
    has_image = any(p.HasField("image") for p in message.content)
    if not (has_text or has_image or message.tool_calls):
        raise invalid(f"{where}.content", "must not be empty")
    for j, part in enumerate(message.content):
        if part.WhichOneof("part") is None:
            raise invalid(f"{where}.content[{j}]", "part has neither text nor image")
        if part.HasField("image"):
            if message.role != pb.ROLE_USER:
                raise invalid(f"{where}.content[{j}].image", "images are allowed in user messages")
            _check_image(part.image, f"{where}.content[{j}].image")
    if message.tool_calls and message.role != pb.ROLE_ASSISTANT:
        raise invalid(f"{where}.tool_calls", "only assistant messages carry tool calls")
    for k, call in enumerate(message.tool_calls):
        if not call.name:
            raise invalid(f"{where}.tool_calls[{k}].name", "must not be empty")
        _check_json_object(call.arguments_json, f"{where}.tool_calls[{k}].arguments_json")
    if message.role == pb.ROLE_TOOL and not message.tool_call_id:
        raise invalid(f"{where}.tool_call_id", "tool messages must name the call they answer")


def _check_image(image: pb.Image, where: str) -> None:
    source = image.WhichOneof("source")
    if source is None or (source == "data" and not image.data):
        raise invalid(where, "image has no data")
    if source == "url" and not image.url.startswith(("data:", "http://", "https://")):
        raise invalid(f"{where}.url", "must be a data: or http(s) URL")
    problem = unsupported(image.mime_type)
    if problem:
        raise invalid(where, problem)


def _check_tools(tools: Sequence[pb.Tool], choice: pb.ToolChoice) -> None:
    names = set()
    for i, tool in enumerate(tools):
        if not TOOL_NAME_RE.fullmatch(tool.name):
            raise invalid(f"tools[{i}].name", "must be 1-64 characters of [A-Za-z0-9_-]")
        if tool.name in names:
            raise invalid(f"tools[{i}].name", f"duplicate tool {tool.name!r}")
        names.add(tool.name)
        where = f"tools[{i}].parameters_json_schema"
        if tool.parameters_json_schema:
            _check_satisfiable(jsontext.load_object(tool.parameters_json_schema, where), where)
    if choice.mode == pb.ToolChoice.MODE_FUNCTION and choice.function_name not in names:
        raise invalid("tool_choice.function_name", "must name one of the tools")
    if choice.mode == pb.ToolChoice.MODE_REQUIRED and not tools:
        raise invalid("tool_choice", "REQUIRED needs at least one tool")


def _check_json_object(text: str, where: str) -> None:
    if text:
        jsontext.load_object(text, where)


def _check_satisfiable(schema: Any, where: str) -> None:
    reason = schemas.unsatisfiable(schema)
    if reason:
        raise invalid(where, f"no value can match this schema: {reason}")


def _check_structured(structured: pb.StructuredOutput) -> None:
    kind = structured.WhichOneof("kind")
    if kind == "json_schema":
        where = "structured_output.json_schema"
        if not structured.json_schema:
            raise invalid(where, "must not be empty")
        _check_satisfiable(jsontext.load_object(structured.json_schema, where), where)
    elif kind == "regex":
        try:
            re.compile(structured.regex)
        except (re.error, OverflowError) as exc:
            raise invalid("structured_output.regex", f"not a valid regex: {exc}") from None
        except RecursionError:
            raise invalid("structured_output.regex", "groups nested too deeply") from None
        reason = regexes.unsatisfiable(structured.regex)
        if reason:
            raise invalid("structured_output.regex", f"no string can match this regex: {reason}")
    elif kind == "choice" and not structured.choice.values:
        raise invalid("structured_output.choice.values", "at least one choice is required")


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
            raise invalid(f"sampling.{name}", "must be a finite number")
    _range(s, "max_tokens", 1, None)
    _range(s, "temperature", 0.0, None)
    _range(s, "min_p", 0.0, 1.0)
    _range(s, "presence_penalty", -2.0, 2.0)
    _range(s, "frequency_penalty", -2.0, 2.0)
    _range(s, "n", 1, MAX_N)
    _range(s, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        raise invalid("sampling.top_p", "must be in (0, 1]")
    if s.HasField("repetition_penalty") and s.repetition_penalty <= 0:
        raise invalid("sampling.repetition_penalty", "must be > 0")
    if s.HasField("top_k") and s.top_k < -1:
        raise invalid("sampling.top_k", "must be -1, 0 or positive")
    if s.HasField("min_tokens") and s.HasField("max_tokens") and s.min_tokens > s.max_tokens:
        raise invalid("sampling.min_tokens", "must not exceed max_tokens")
    if len(s.stop) > MAX_STOP or any(not stop for stop in s.stop):
        raise invalid("sampling.stop", f"at most {MAX_STOP} non-empty strings")


def _range(s: pb.SamplingParams, name: str, low: float, high: float | None) -> None:
    if not s.HasField(name):
        return
    value = getattr(s, name)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise invalid(f"sampling.{name}", f"{value} is out of range {bound}")
