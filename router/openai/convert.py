"""OpenAI request bodies into the API's protobuf requests, and field names back.

A body becomes the ``ChatRequest`` or ``GenerateRequest`` a gRPC client would
send for the same thing; everything after that (validation, admission, the
worker's checks) is the gRPC path's own. When one of those checks names a
protobuf field (``sampling.top_p``), :meth:`Converted.param` names the body's
argument that carried it (``top_p``).

Only what the protobuf cannot express is refused here: arguments this server
does not implement (``logit_bias``, ``echo``, ``suffix``, ``best_of`` > ``n``,
several prompts) and OpenAI's own pairings (``top_logprobs`` needs ``logprobs``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid
from router.openai import protocol as p

ROLES: Final = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
PRIORITIES: Final = {"low": pb.PRIORITY_LOW, "normal": pb.PRIORITY_NORMAL, "high": pb.PRIORITY_HIGH}
TOOL_CHOICES: Final = {
    "none": pb.ToolChoice.MODE_NONE,
    "auto": pb.ToolChoice.MODE_AUTO,
    "required": pb.ToolChoice.MODE_REQUIRED,
}
COMPLETIONS_MAX_TOKENS: Final = 16
"""OpenAI's (and vLLM's) default ``max_tokens`` for ``/v1/completions``."""
CLIENT_ID_HEADER: Final = "X-Request-Id"

_MESSAGE = r"^messages\[(\d+)\]"
_RENAMES: Final[Sequence[tuple[re.Pattern[str], str]]] = [
    (
        re.compile(_MESSAGE + r"\.content\[(\d+)\]\.image(\..*)?$"),
        r"messages[\1].content[\2].image_url",
    ),
    (
        re.compile(_MESSAGE + r"\.tool_calls\[(\d+)\]\.arguments_json$"),
        r"messages[\1].tool_calls[\2].function.arguments",
    ),
    (
        re.compile(_MESSAGE + r"\.tool_calls\[(\d+)\]\.name$"),
        r"messages[\1].tool_calls[\2].function.name",
    ),
    (re.compile(r"^tools\[(\d+)\]\.parameters_json_schema$"), r"tools[\1].function.parameters"),
    (re.compile(r"^tools\[(\d+)\]\.(name|description)$"), r"tools[\1].function.\2"),
    (re.compile(r"^tool_choice\.function_name$"), "tool_choice.function.name"),
    (re.compile(r"^tool_choice(\.mode)?$"), "tool_choice"),
    (re.compile(r"^chat_template_kwargs_json$"), "chat_template_kwargs"),
    (re.compile(r"^client_request_id$"), CLIENT_ID_HEADER),
    (re.compile(r"^token_ids\.ids(\[\d+\])?$"), r"prompt\1"),
    (re.compile(r"^(text|token_ids|images)$"), "prompt"),
    (re.compile(r"^sampling\.(\w+)$"), r"\1"),
]
"""Protobuf field paths -> body argument paths; the first match wins."""


@dataclass
class Converted:
    """A protobuf request and where its fields came from in the body."""

    request: pb.ChatRequest | pb.GenerateRequest
    origins: dict[str, str] = field(default_factory=dict)
    """Protobuf field (or prefix) -> the body argument it came from, where not the rule's."""

    def param(self, pb_field: str) -> str:
        """The body argument (or header) that a protobuf field path stands for."""
        if not pb_field:
            return ""
        for prefix, origin in self.origins.items():
            if pb_field == prefix or pb_field.startswith(prefix + "."):
                return origin
        for pattern, replacement in _RENAMES:
            if pattern.match(pb_field):
                return pattern.sub(replacement, pb_field)
        return pb_field


# ------------------------------------------------------------------ chat


def _image(url: p.ImageURL) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(url=url.url))


def _content(content: str | list[p.ContentPart] | None, where: str) -> list[pb.ContentPart]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [pb.ContentPart(text=content)]
    parts = []
    for j, part in enumerate(content):
        if part.type == "text":
            if part.text is None:
                raise invalid(f"{where}[{j}].text", "a text part needs text")
            parts.append(pb.ContentPart(text=part.text))
        else:
            if part.image_url is None:
                raise invalid(f"{where}[{j}].image_url", "an image_url part needs image_url")
            parts.append(_image(part.image_url))
    return parts


def _message(message: p.Message, i: int) -> pb.Message:
    out = pb.Message(
        role=ROLES[message.role],
        content=_content(message.content, f"messages[{i}].content"),
        tool_call_id=message.tool_call_id or "",
        name=message.name or "",
        reasoning=message.reasoning or message.reasoning_content or "",
    )
    for call in message.tool_calls or ():
        out.tool_calls.add(
            id=call.id or "", name=call.function.name, arguments_json=call.function.arguments
        )
    return out


def _tools(body: p.ChatCompletionRequest, out: pb.ChatRequest) -> None:
    for tool in body.tools or ():
        schema = tool.function.parameters
        out.tools.add(
            name=tool.function.name,
            description=tool.function.description or "",
            parameters_json_schema="" if schema is None else json.dumps(schema),
        )
    choice = body.tool_choice
    if isinstance(choice, str):
        out.tool_choice.mode = TOOL_CHOICES[choice]
    elif choice is not None:
        out.tool_choice.mode = pb.ToolChoice.MODE_FUNCTION
        out.tool_choice.function_name = choice.function.name
    if body.parallel_tool_calls is False:
        raise invalid(
            "parallel_tool_calls", "false is not supported: the model may call several tools"
        )


def chat_request(body: p.ChatCompletionRequest, client_request_id: str = "") -> Converted:
    """The ``ChatRequest`` for a chat completion body."""
    out = pb.ChatRequest(
        model=body.model or "",
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        client_request_id=client_request_id,
    )
    converted = Converted(out)
    _tools(body, out)
    if body.chat_template_kwargs is not None:
        out.chat_template_kwargs_json = json.dumps(body.chat_template_kwargs)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    _common(body, out, converted)
    if body.max_completion_tokens is not None:
        out.sampling.max_tokens = body.max_completion_tokens
        converted.origins["sampling.max_tokens"] = "max_completion_tokens"
    out.sampling.logprobs = body.logprobs
    if body.top_logprobs is not None:
        out.sampling.top_logprobs = body.top_logprobs
    return converted


# ------------------------------------------------------------------ completions


def _prompt(prompt: str | list[int] | list[str] | list[list[int]], out: pb.GenerateRequest) -> None:
    if isinstance(prompt, str):
        out.text = prompt
        return
    if prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise invalid("prompt", f"{len(prompt)} prompts; send one prompt per request")
        _prompt(prompt[0], out)
        return
    out.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    if not prompt:
        out.token_ids.SetInParent()


def completion_request(body: p.CompletionRequest, client_request_id: str = "") -> Converted:
    """The ``GenerateRequest`` for a completion body."""
    if body.echo:
        raise invalid("echo", "echoing the prompt is not supported")
    if body.suffix:
        raise invalid("suffix", "suffixes are not supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise invalid("best_of", "must equal n (choices are not ranked here)")
    out = pb.GenerateRequest(model=body.model or "", client_request_id=client_request_id)
    _prompt(body.prompt, out)
    converted = Converted(out, {"sampling.top_logprobs": "logprobs"})
    _common(body, out, converted)
    out.sampling.max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if body.logprobs is not None:
        out.sampling.logprobs = True
        out.sampling.top_logprobs = body.logprobs
    return converted


# ------------------------------------------------------------------ shared


SAMPLING: Final = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
    "seed",
)


def _common(
    body: p.ChatCompletionRequest | p.CompletionRequest,
    out: pb.ChatRequest | pb.GenerateRequest,
    converted: Converted,
) -> None:
    """Sampling, constraint, priority and the arguments both endpoints refuse."""
    if body.logit_bias:
        raise invalid("logit_bias", "logit biases are not supported")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options", "only allowed with stream: true")
    s = out.sampling
    for name in SAMPLING:
        value = getattr(body, name)
        if value is not None:
            setattr(s, name, value)
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    s.stop_token_ids.extend(body.stop_token_ids or ())
    s.ignore_eos = body.ignore_eos
    s.include_stop_str_in_output = body.include_stop_str_in_output
    if body.priority is not None:
        out.priority = PRIORITIES[body.priority]
    _constraint(body, out.structured_output, converted)


def _constraint(
    body: p.ChatCompletionRequest | p.CompletionRequest,
    out: pb.StructuredOutput,
    converted: Converted,
) -> None:
    """``response_format`` or vLLM's ``structured_outputs`` (one of them) as the constraint."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text":
        if so is not None:
            raise invalid("structured_outputs", "send either response_format or structured_outputs")
        if fmt.type == "json_object":
            out.json_object = True
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid(
                "response_format.json_schema.schema", "a json_schema format needs a schema"
            )
        else:
            out.json_schema = json.dumps(fmt.json_schema.schema_)
        converted.origins["structured_output"] = (
            "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
        )
        return
    if so is None:
        return
    _structured_outputs(so, out, converted)


def _structured_outputs(
    so: p.StructuredOutputs, out: pb.StructuredOutput, converted: Converted
) -> None:
    kinds = [k for k in ("json_", "regex", "choice", "json_object") if getattr(so, k) is not None]
    if len(kinds) != 1:
        raise invalid("structured_outputs", "set exactly one of json, regex, choice, json_object")
    if so.json_ is not None:
        out.json_schema = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
        converted.origins["structured_output"] = "structured_outputs.json"
    elif so.regex is not None:
        out.regex = so.regex
        converted.origins["structured_output"] = "structured_outputs.regex"
    elif so.choice is not None:
        out.choice.values.extend(so.choice)
        out.choice.SetInParent()
        converted.origins["structured_output"] = "structured_outputs.choice"
    else:
        out.json_object = bool(so.json_object)
        converted.origins["structured_output"] = "structured_outputs.json_object"
