"""API request -> vLLM input conversion, as pure functions.

Everything here is deterministic and needs no engine: OpenAI-style chat message
dicts for vLLM's renderer, tool definitions, tool choice, chat template kwargs,
structured-output constraints, ``vllm.SamplingParams`` and the scheduling
priority. Invalid input raises :class:`qwen_serve.errors.RequestError`
(INVALID_ARGUMENT) naming the offending field, e.g. ``messages[2].content[0].image``.
Images are fetched, checked and decoded beforehand by ``worker.images`` (see
:func:`image_refs`); the conversions here take the decoded images by field name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jsonschema
from PIL.Image import Image as PILImage

from qwen_serve import jsontext
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RequestError, clean, invalid
from worker.vllm_boundary import (
    ChatCompletionRequest,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    VLLMValidationError,
)

logger = logging.getLogger(__name__)

ROLES: Final[Mapping[int, str]] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
TOOL_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_TEMPLATE_KWARGS: Final = frozenset(
    {"chat_template", "tools", "documents", "messages", "tokenize"}
    | {"add_generation_prompt", "continue_final_message"}
)
BOOLEAN_TEMPLATE_KWARGS: Final = frozenset({"enable_thinking", "thinking"})
"""Template switches that vLLM's reasoning parsers read too: they must be booleans."""
SAMPLING_DEFAULTS: Final[Mapping[str, float | int]] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}
"""vLLM's defaults for fields neither the request nor the generation config sets."""
PRIORITIES: Final[Mapping[int, int]] = {
    pb.PRIORITY_HIGH: -1,
    pb.PRIORITY_NORMAL: 0,
    pb.PRIORITY_UNSPECIFIED: 0,
    pb.PRIORITY_LOW: 1,
}
"""API priority -> vLLM priority. vLLM serves lower values first; ties go by arrival."""


# ------------------------------------------------------------------ chat


def image_refs(req: pb.ChatRequest) -> list[tuple[str, pb.Image]]:
    """Every image part of the conversation with its field name, in order."""
    return [
        (f"messages[{i}].content[{k}].image", part.image)
        for i, message in enumerate(req.messages)
        for k, part in enumerate(message.content)
        if part.WhichOneof("part") == "image"
    ]


def _content(
    message: pb.Message, field: str, images: Mapping[str, PILImage]
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for k, part in enumerate(message.content):
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "image":
            image_field = f"{field}.content[{k}].image"
            if image_field not in images:
                raise invalid(image_field, "image was not loaded")
            parts.append({"type": "image_pil", "image_pil": images[image_field]})
        else:
            raise invalid(f"{field}.content[{k}]", "content part is empty")
    return parts


def _json_object(text: str, field: str, *, empty: str = "{}") -> dict[str, Any]:
    return jsontext.load_object(text or empty, field)


def _tool_calls(message: pb.Message, field: str) -> list[dict[str, Any]]:
    calls = []
    for j, call in enumerate(message.tool_calls):
        call_field = f"{field}.tool_calls[{j}]"
        if not call.name:
            raise invalid(f"{call_field}.name", "tool call has no name")
        _json_object(call.arguments_json, f"{call_field}.arguments_json")
        calls.append(
            {
                "id": call.id or f"call_{j}",
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
            }
        )
    return calls


def chat_message(
    message: pb.Message, field: str, images: Mapping[str, PILImage] | None = None
) -> dict[str, Any]:
    """One API message as an OpenAI-style message dict (images as decoded ``image_pil``)."""
    role = ROLES.get(message.role)
    if role is None:
        raise invalid(f"{field}.role", "role must be system, user, assistant or tool")
    out: dict[str, Any] = {"role": role, "content": _content(message, field, images or {})}
    if message.tool_calls:
        if role != "assistant":
            raise invalid(f"{field}.tool_calls", "only assistant messages carry tool calls")
        out["tool_calls"] = _tool_calls(message, field)
    if message.reasoning:
        if role != "assistant":
            raise invalid(f"{field}.reasoning", "only assistant messages carry reasoning")
        out["reasoning"] = message.reasoning
    if role == "tool":
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def chat_messages(
    req: pb.ChatRequest, images: Mapping[str, PILImage] | None = None
) -> list[dict[str, Any]]:
    """The conversation as OpenAI-style message dicts.

    ``images`` maps each field of :func:`image_refs` to its decoded image.
    """
    if not req.messages:
        raise invalid("messages", "at least one message is required")
    return [chat_message(m, f"messages[{i}]", images) for i, m in enumerate(req.messages)]


def _check_schema(schema: Any, field: str) -> None:
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    if declared is not None and not isinstance(declared, str):
        raise invalid(field, '"$schema" must be a URI string')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise invalid(field, f"not a valid JSON Schema: {exc.message}") from None


def tools(req: pb.ChatRequest) -> list[dict[str, Any]] | None:
    """The request's tools as OpenAI function-tool dicts; None when there are none."""
    if not req.tools:
        return None
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j, tool in enumerate(req.tools):
        if not TOOL_NAME.match(tool.name):
            raise invalid(f"tools[{j}].name", "must match [A-Za-z0-9_-]{1,64}")
        if tool.name in seen:
            raise invalid(f"tools[{j}].name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        field = f"tools[{j}].parameters_json_schema"
        schema = _json_object(tool.parameters_json_schema, field, empty='{"type": "object"}')
        _check_schema(schema, field)
        function = {"name": tool.name, "description": tool.description, "parameters": schema}
        out.append({"type": "function", "function": function})
    return out


def tool_choice(req: pb.ChatRequest) -> str | dict[str, Any]:
    """OpenAI ``tool_choice``: "none", "auto", "required" or a named function."""
    mode = req.tool_choice.mode
    if mode == pb.ToolChoice.MODE_UNSPECIFIED:
        return "auto" if req.tools else "none"
    if mode == pb.ToolChoice.MODE_NONE:
        return "none"
    if not req.tools:
        raise invalid("tool_choice.mode", "tool choice needs at least one tool")
    if mode == pb.ToolChoice.MODE_AUTO:
        return "auto"
    if mode == pb.ToolChoice.MODE_REQUIRED:
        return "required"
    if mode == pb.ToolChoice.MODE_FUNCTION:
        name = req.tool_choice.function_name
        if name not in {t.name for t in req.tools}:
            raise invalid("tool_choice.function_name", f"no tool is named {name!r}")
        return {"type": "function", "function": {"name": name}}
    raise invalid("tool_choice.mode", f"unknown mode {mode}")


def chat_template_kwargs(req: pb.ChatRequest) -> dict[str, Any]:
    """Keyword arguments for the chat template (``enable_thinking`` wins over the JSON)."""
    field = "chat_template_kwargs_json"
    kwargs = _json_object(req.chat_template_kwargs_json, field)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise invalid(field, f"may not set {', '.join(reserved)}")
    for name in BOOLEAN_TEMPLATE_KWARGS & kwargs.keys():
        if not isinstance(kwargs[name], bool):
            raise invalid(field, f"{name} must be true or false")
    if req.HasField("enable_thinking"):
        kwargs["enable_thinking"] = req.enable_thinking
    return kwargs


def vllm_chat_request(
    messages: list[dict[str, Any]],
    tool_dicts: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any],
    template_kwargs: dict[str, Any],
    structured: StructuredOutputsParams | None,
) -> ChatCompletionRequest:
    """The vLLM request its parsers read (tools, tool_choice), validated by vLLM."""
    try:
        return ChatCompletionRequest.model_validate(
            {
                "messages": messages,
                "tools": tool_dicts,
                "tool_choice": tool_choice,
                "chat_template_kwargs": template_kwargs,
                "structured_outputs": structured,
                "stream": True,
            }
        )
    except VLLMValidationError as exc:
        top = (exc.parameter or "").split(".")[0]
        raise from_validation_error(
            exc, top if top in ("tools", "tool_choice") else "structured_output"
        ) from None
    except ValueError as exc:  # pydantic's ValidationError
        raise invalid("messages", str(exc)) from None


# ------------------------------------------------------------------ sampling


def structured_field(so: pb.StructuredOutput) -> str | None:
    """The API field of the request's output constraint, if any."""
    kind = so.WhichOneof("kind")
    return None if kind is None else f"structured_output.{kind}"


def constraint_field(req: pb.ChatRequest | pb.GenerateRequest) -> str | None:
    """The API field whose constraint the engine's grammar enforces, if any.

    ``structured_output``; else, for a chat whose tool choice forces a call, the
    tools whose parameter schemas vLLM turns into the grammar.
    """
    field = structured_field(req.structured_output)
    if field is not None or isinstance(req, pb.GenerateRequest) or not req.tools:
        return field
    choice = req.tool_choice
    if choice.mode == pb.ToolChoice.MODE_REQUIRED:
        return "tools"
    if choice.mode == pb.ToolChoice.MODE_FUNCTION:
        names = [tool.name for tool in req.tools]
        if choice.function_name in names:
            return f"tools[{names.index(choice.function_name)}].parameters_json_schema"
    return None


def structured_outputs(
    so: pb.StructuredOutput, field: str = "structured_output"
) -> StructuredOutputsParams | None:
    """The constraint as vLLM ``StructuredOutputsParams``; None when unconstrained."""
    kind = so.WhichOneof("kind")
    if kind == "json_schema":
        schema = jsontext.load(so.json_schema, f"{field}.json_schema")
        if not isinstance(schema, dict | bool):
            raise invalid(f"{field}.json_schema", "must be a JSON object")
        _check_schema(schema, f"{field}.json_schema")
        return StructuredOutputsParams(json=schema)
    if kind == "regex":
        if not so.regex:
            raise invalid(f"{field}.regex", "regex is empty")
        return StructuredOutputsParams(regex=so.regex)
    if kind == "choice":
        values = list(so.choice.values)
        if not values or not all(values):
            raise invalid(f"{field}.choice.values", "needs at least one non-empty value")
        return StructuredOutputsParams(choice=values)
    if kind == "json_object" and so.json_object:
        return StructuredOutputsParams(json_object=True)
    return None


def _round(value: float) -> float:
    """A proto float32 as the decimal the client most likely meant (0.7, not 0.69999)."""
    return float(f"{value:.7g}")


def _sampled(sampling: pb.SamplingParams, defaults: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fallback in SAMPLING_DEFAULTS.items():
        if sampling.HasField(name):
            value = getattr(sampling, name)
            out[name] = value if isinstance(value, int) else _round(value)
        else:
            out[name] = defaults.get(name, fallback)
    return out


def max_tokens(
    sampling: pb.SamplingParams,
    defaults: Mapping[str, Any],
    max_context: int,
    prompt_len: int | None,
    prompt_field: str = "messages",
) -> int | None:
    """Output budget: the request's, checked to fit, or whatever room the context leaves."""
    room = None if prompt_len is None else max_context - prompt_len
    if room is not None and room <= 0:
        raise invalid(
            prompt_field,
            f"the prompt has {prompt_len} tokens, leaving no room for output in the "
            f"context of {max_context} tokens",
        )
    if sampling.HasField("max_tokens"):
        if room is not None and sampling.max_tokens > room:
            raise invalid(
                "sampling.max_tokens",
                f"{sampling.max_tokens} output tokens do not fit: the prompt has "
                f"{prompt_len} tokens and the context holds {max_context}",
            )
        return sampling.max_tokens
    default = defaults.get("max_tokens")
    candidates = [v for v in (room, default) if v is not None]
    return min(candidates) if candidates else None


def _stop_token_ids(sampling: pb.SamplingParams, defaults: Mapping[str, Any]) -> list[int]:
    ids = list(sampling.stop_token_ids)
    return list(dict.fromkeys([*ids, *(defaults.get("stop_token_ids") or ())]))


def sampling_params(
    sampling: pb.SamplingParams,
    structured: pb.StructuredOutput,
    defaults: Mapping[str, Any],
    max_context: int,
    prompt_len: int | None,
    *,
    skip_special_tokens: bool = True,
    prompt_field: str = "messages",
) -> SamplingParams:
    """vLLM ``SamplingParams`` (output kind DELTA) for the API sampling settings.

    Unset fields take ``defaults`` (the model's generation config, from
    ``ModelConfig.get_diff_sampling_param()``), then vLLM's defaults.
    """
    kwargs = _sampled(sampling, defaults)
    try:
        return SamplingParams(
            n=sampling.n if sampling.HasField("n") else 1,
            **kwargs,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=list(sampling.stop),
            stop_token_ids=_stop_token_ids(sampling, defaults),
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            ignore_eos=sampling.ignore_eos,
            max_tokens=max_tokens(sampling, defaults, max_context, prompt_len, prompt_field),
            min_tokens=sampling.min_tokens,
            logprobs=(sampling.top_logprobs if sampling.logprobs else None),
            skip_special_tokens=skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs(structured),
        )
    except VLLMValidationError as exc:
        raise from_validation_error(exc, "sampling") from None


SAMPLING_FIELDS: Final[Mapping[str, str]] = {
    "logprobs": "sampling.top_logprobs",
    "max_tokens": "sampling.max_tokens",
    "max_completion_tokens": "sampling.max_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "stop_token_ids": "sampling.stop_token_ids",
    "n": "sampling.n",
}


def from_validation_error(exc: VLLMValidationError, field: str) -> RequestError:
    """INVALID_ARGUMENT for a vLLM validation error, naming the field where known."""
    parameter = exc.parameter or ""
    message = exc.args[0] if exc.args else str(exc)
    return invalid(SAMPLING_FIELDS.get(parameter, field), clean(str(message)))


def priority(p: int) -> int:
    """vLLM priority for an API priority: HIGH -1, NORMAL/unset 0, LOW 1 (lower runs first)."""
    return PRIORITIES.get(p, 0)


# ------------------------------------------------------------------ generate


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    """The ids as a list, each checked to be below ``vocab_size``."""
    if not ids:
        raise invalid(field, "at least one token id is required")
    for i, token in enumerate(ids):
        if token >= vocab_size:
            raise invalid(f"{field}[{i}]", f"token id {token} is not below {vocab_size}")
    return list(ids)


def generate_prompt(
    req: pb.GenerateRequest, vocab_size: int, images: Sequence[PILImage] = ()
) -> dict[str, Any]:
    """A vLLM TextPrompt or TokensPrompt dict, with the decoded ``images`` as multi_modal_data."""
    kind = req.WhichOneof("prompt")
    prompt: dict[str, Any]
    if kind == "text":
        if not req.text:
            raise invalid("text", "the prompt is empty")
        prompt = {"prompt": req.text}
    elif kind == "token_ids":
        ids = check_token_ids(req.token_ids.ids, vocab_size, "token_ids.ids")
        prompt = {"prompt_token_ids": ids}
    else:
        raise invalid("prompt", "set text or token_ids")
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt
