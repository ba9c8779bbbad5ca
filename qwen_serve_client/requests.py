"""Pure builders of ChatRequest and GenerateRequest from keyword arguments.

Both clients call these, so ``client.chat(...)`` and ``chat_request(...)`` take
the same arguments. Sampling settings are plain keywords (``max_tokens=64,
temperature=0.2``); an argument left out is left unset, so the server uses the
model's generation config for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict, Unpack

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client.content import ImageSource, MessageLike, image, messages_of
from qwen_serve_client.tools import tool_choice as make_tool_choice

PriorityName = Literal["low", "normal", "high"]

PRIORITIES: dict[str, int] = {
    "low": pb.PRIORITY_LOW,
    "normal": pb.PRIORITY_NORMAL,
    "high": pb.PRIORITY_HIGH,
}


class Sampling(TypedDict, total=False):
    """Sampling keywords; each maps to the ``SamplingParams`` field of the same name."""

    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    n: int
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    seed: int
    include_stop_str_in_output: bool


class Constraint(TypedDict, total=False):
    """At most one structured-output constraint."""

    json_schema: Mapping[str, Any] | str
    regex: str
    choice: Sequence[str]
    json_object: bool


def sampling_params(**kwargs: Any) -> pb.SamplingParams:
    """``SamplingParams`` from :class:`Sampling` keywords (None values are skipped)."""
    params = pb.SamplingParams()
    for key, value in kwargs.items():
        if key not in Sampling.__annotations__:
            raise TypeError(f"unknown sampling argument {key!r}")
        if value is None:
            continue
        if key in ("stop", "stop_token_ids"):
            getattr(params, key).extend(value)
        else:
            setattr(params, key, value)
    return params


def structured_output(**kwargs: Any) -> pb.StructuredOutput:
    """``StructuredOutput`` from at most one :class:`Constraint` keyword."""
    given = {k: v for k, v in kwargs.items() if v not in (None, False)}
    if len(given) > 1:
        raise ValueError(f"give at most one structured-output constraint, not {sorted(given)}")
    out = pb.StructuredOutput()
    for key, value in given.items():
        if key == "json_schema":
            out.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif key == "regex":
            out.regex = value
        elif key == "choice":
            out.choice.values.extend(value)
        elif key == "json_object":
            out.json_object = True
        else:
            raise TypeError(f"unknown structured-output argument {key!r}")
    return out


def _priority(priority: PriorityName | None) -> int:
    if priority is None:
        return pb.PRIORITY_UNSPECIFIED
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(PRIORITIES)}")
    return PRIORITIES[priority]


class ChatArgs(Sampling, Constraint, total=False):
    """Every keyword of a chat: sampling, one constraint, and these."""

    model: str
    tools: Sequence[pb.Tool]
    tool_choice: str | pb.ToolChoice
    think: bool
    priority: PriorityName
    client_request_id: str
    chat_template_kwargs: Mapping[str, Any]


class GenerateArgs(Sampling, Constraint, total=False):
    """Every keyword of a generate call: sampling, one constraint, and these."""

    model: str
    images: Sequence[ImageSource]
    priority: PriorityName
    client_request_id: str


def _split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(sampling, constraint, other) keywords."""
    sampling = {k: v for k, v in kwargs.items() if k in Sampling.__annotations__}
    constraint = {k: v for k, v in kwargs.items() if k in Constraint.__annotations__}
    other = {k: v for k, v in kwargs.items() if k not in sampling and k not in constraint}
    return sampling, constraint, other


def chat_request(
    messages: MessageLike | Sequence[MessageLike], **kwargs: Unpack[ChatArgs]
) -> pb.ChatRequest:
    """A ChatRequest. Leaving ``think`` out keeps the model's default (thinking on)."""
    sampling, constraint, other = _split(kwargs)
    unknown = set(other) - set(ChatArgs.__annotations__)
    if unknown:
        raise TypeError(f"unknown chat arguments: {sorted(unknown)}")
    request = pb.ChatRequest(
        model=other.get("model", ""),
        messages=messages_of(messages),
        tools=list(other.get("tools", ())),
        priority=_priority(other.get("priority")),  # type: ignore[arg-type]
        client_request_id=other.get("client_request_id", ""),
        structured_output=structured_output(**constraint),
        sampling=sampling_params(**sampling),
    )
    choice = other.get("tool_choice")
    if isinstance(choice, str):
        request.tool_choice.CopyFrom(make_tool_choice(choice))
    elif choice is not None:
        request.tool_choice.CopyFrom(choice)
    if other.get("think") is not None:
        request.enable_thinking = other["think"]
    if other.get("chat_template_kwargs"):
        request.chat_template_kwargs_json = json.dumps(dict(other["chat_template_kwargs"]))
    return request


def generate_request(
    prompt: str | Sequence[int], **kwargs: Unpack[GenerateArgs]
) -> pb.GenerateRequest:
    """A GenerateRequest for prompt text or token ids (images in placeholder order)."""
    sampling, constraint, other = _split(kwargs)
    unknown = set(other) - set(GenerateArgs.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate arguments: {sorted(unknown)}")
    request = pb.GenerateRequest(
        model=other.get("model", ""),
        images=[image(i) for i in other.get("images", ())],
        priority=_priority(other.get("priority")),  # type: ignore[arg-type]
        client_request_id=other.get("client_request_id", ""),
        structured_output=structured_output(**constraint),
        sampling=sampling_params(**sampling),
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request
