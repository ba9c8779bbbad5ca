"""A ChatRequest -> the inputs of vLLM's chat renderer and parsers, as pure functions.

OpenAI-style message dicts (images as the decoded ``image_pil``), tool definitions,
tool choice, chat template kwargs and the ``ChatCompletionRequest`` that vLLM's tool
and reasoning parsers read. The router has checked every rule that needs no engine
(``router/validation.py``), so these convert and trust it; where a conversion needs a
value it parses (JSON) or looks up (a role), bad data still raises
:class:`~qwen_serve.errors.RequestError` with the wording of ``qwen_serve.request_rules``.
Images are fetched, checked and decoded beforehand by ``worker.images`` (see
:func:`image_refs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from PIL.Image import Image as PILImage

from qwen_serve import jsontext
from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid
from worker.sampling import from_validation_error
from worker.vllm_boundary import (
    ChatCompletionRequest,
    StructuredOutputsParams,
    VLLMValidationError,
)

TOOL_CHOICES: Final[Mapping[int, str]] = {
    pb.ToolChoice.MODE_NONE: "none",
    pb.ToolChoice.MODE_AUTO: "auto",
    pb.ToolChoice.MODE_REQUIRED: "required",
}
"""API tool-choice modes -> OpenAI's ``tool_choice`` strings (a named function aside)."""


def image_refs(req: pb.ChatRequest) -> list[tuple[str, pb.Image]]:
    """Every image part of the conversation with its field name, in order."""
    return [
        (rules.image_part_field(rules.message_field(i), k), part.image)
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
            image_field = rules.image_part_field(field, k)
            if image_field not in images:
                raise invalid(image_field, "image was not loaded")
            parts.append({"type": "image_pil", "image_pil": images[image_field]})
        else:
            raise rules.empty_part(rules.part_field(field, k))
    return parts


def _tool_calls(message: pb.Message) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id or f"call_{j}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
        }
        for j, call in enumerate(message.tool_calls)
    ]


def chat_message(
    message: pb.Message, field: str, images: Mapping[str, PILImage] | None = None
) -> dict[str, Any]:
    """One API message as an OpenAI-style message dict (images as decoded ``image_pil``)."""
    role = rules.role_name(message.role, field)
    out: dict[str, Any] = {"role": role, "content": _content(message, field, images or {})}
    if message.tool_calls:
        out["tool_calls"] = _tool_calls(message)
    if message.reasoning:
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
    return [chat_message(m, rules.message_field(i), images) for i, m in enumerate(req.messages)]


def tools(req: pb.ChatRequest) -> list[dict[str, Any]] | None:
    """The request's tools as OpenAI function-tool dicts; None when there are none."""
    if not req.tools:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": rules.tool_schema(tool, j),
            },
        }
        for j, tool in enumerate(req.tools)
    ]


def tool_choice(req: pb.ChatRequest) -> str | dict[str, Any]:
    """OpenAI ``tool_choice``: "none", "auto", "required" or a named function."""
    mode = req.tool_choice.mode
    if mode == pb.ToolChoice.MODE_UNSPECIFIED:
        return "auto" if req.tools else "none"
    if mode == pb.ToolChoice.MODE_FUNCTION:
        return {"type": "function", "function": {"name": req.tool_choice.function_name}}
    if mode not in TOOL_CHOICES:
        raise rules.unknown_tool_choice(mode)
    return TOOL_CHOICES[mode]


def chat_template_kwargs(req: pb.ChatRequest) -> dict[str, Any]:
    """Keyword arguments for the chat template (``enable_thinking`` wins over the JSON)."""
    kwargs = jsontext.load_object(req.chat_template_kwargs_json or "{}", rules.TEMPLATE_KWARGS)
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
            exc, top if top in ("tools", rules.TOOL_CHOICE) else rules.STRUCTURED
        ) from None
    except ValueError as exc:  # pydantic's ValidationError
        raise invalid(rules.MESSAGES, str(exc)) from None
