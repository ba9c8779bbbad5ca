"""Typed stream events: one frozen dataclass per ``ChatEvent`` kind.

A stream is ``Started``, then ``Delta`` events (reasoning, content and tool-call
fragments of one choice), one ``Finished`` per choice and a last ``Usage``. A
request that fails after it was accepted ends with one ``StreamError`` instead.
Match on them::

    match event:
        case Delta(content=text):
            print(text, end="")
        case Finished(reason=FinishReason.TOOL_CALLS, tool_calls=calls):
            ...
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb


class FinishReason(enum.StrEnum):
    """Why a choice ended."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"


_FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS,
    pb.FINISH_REASON_ABORT: FinishReason.ABORT,
}


@dataclass(frozen=True, slots=True)
class Started:
    """The request was accepted; ``request_id`` is what ``abort`` takes."""

    request_id: str
    client_request_id: str
    model: str


@dataclass(frozen=True, slots=True)
class ToolCallFragment:
    """A piece of one tool call: id and name on its first fragment, then argument text."""

    index: int
    id: str
    name: str
    arguments_fragment: str


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One likely alternative token."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """Log probability of one sampled token, with alternatives when asked for."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of choice ``index``."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[ToolCallFragment, ...] = ()
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call; ``arguments`` is the parsed JSON object."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments as a dict ({} when the text is not a JSON object)."""
        try:
            value = json.loads(self.arguments_json or "{}")
        except (ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}

    def to_proto(self) -> pb.ToolCall:
        """The wire form, for an assistant message of the next turn."""
        return pb.ToolCall(id=self.id, name=self.name, arguments_json=self.arguments_json)


@dataclass(frozen=True, slots=True)
class Finished:
    """Choice ``index`` ended; complete tool calls are in ``tool_calls``."""

    index: int
    reason: FinishReason
    matched_stop: str = ""
    matched_stop_token_id: int | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of the whole request; the last event of a successful stream."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class StreamError:
    """The request failed after acceptance; the last event of its stream."""

    code: int
    message: str
    retryable: bool = False
    field: str = ""
    """The request field concerned ("" if none), e.g. ``messages[1].content[0].image``."""
    status: grpc.StatusCode = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", status_code(self.code))


Event: TypeAlias = Started | Delta | Finished | Usage | StreamError
"""Any event of a Chat or Generate stream."""


def status_code(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a status number (UNKNOWN when out of range)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _delta(d: pb.Delta) -> Delta:
    return Delta(
        index=d.index,
        reasoning=d.reasoning,
        content=d.content,
        tool_calls=tuple(
            ToolCallFragment(t.index, t.id, t.name, t.arguments_fragment) for t in d.tool_calls
        ),
        token_ids=tuple(d.token_ids),
        logprobs=tuple(
            TokenLogprob(
                lp.token_id,
                lp.token,
                lp.logprob,
                tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in lp.top),
            )
            for lp in d.logprobs
        ),
    )


def _finished(f: pb.Finished) -> Finished:
    return Finished(
        index=f.index,
        reason=_FINISH_REASONS.get(f.reason, FinishReason.UNSPECIFIED),
        matched_stop=f.matched_stop,
        matched_stop_token_id=(
            f.matched_stop_token_id if f.HasField("matched_stop_token_id") else None
        ),
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments_json) for c in f.tool_calls),
    )


def from_proto(event: pb.ChatEvent) -> Event:
    """The typed event of a wire ``ChatEvent`` (ValueError when it is empty)."""
    kind = event.WhichOneof("event")
    if kind == "started":
        s = event.started
        return Started(s.request_id, s.client_request_id, s.model)
    if kind == "delta":
        return _delta(event.delta)
    if kind == "finished":
        return _finished(event.finished)
    if kind == "usage":
        u = event.usage
        return Usage(u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.cached_tokens)
    if kind == "error":
        e = event.error
        return StreamError(e.code, e.message, e.retryable, e.field)
    raise ValueError("empty ChatEvent (newer server? upgrade qwen-serve-client)")


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of ``event`` with its kind under ``"type"`` (for ``--json`` output)."""
    kinds: dict[type, str] = {
        Started: "started",
        Delta: "delta",
        Finished: "finished",
        Usage: "usage",
        StreamError: "error",
    }
    body: dict[str, Any] = {"type": kinds[type(event)]}
    for name in event.__dataclass_fields__:
        body[name] = _plain(getattr(event, name))
    if isinstance(event, Finished):
        for call, plain in zip(event.tool_calls, body["tool_calls"], strict=True):
            plain["arguments"] = call.arguments
    return body


def _plain(value: Any) -> Any:
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value
