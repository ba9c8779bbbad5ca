"""Typed events into OpenAI's response objects: streamed chunks and whole responses.

One :class:`ChatStream` or :class:`CompletionStream` per request turns each
event into the chunk (``data:`` payload) an OpenAI client expects, in the shapes
vLLM's server uses, including its extensions (``reasoning``, ``stop_reason``,
``token_ids``). :class:`Folded` gathers a request's events for the
non-streamed answer. Nothing is sent before the first output: a client that
times its first chunk measures time to first token, as against vLLM.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from qwen_serve.api.v1 import serve_pb2 as pb

FINISH_REASONS: Final = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_ABORT: "abort",
}
MIN_LOGPROB: Final = -9999.0
"""Stands for -inf (JSON has no infinity), as in vLLM."""
DONE: Final = b"data: [DONE]\n\n"


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def sse(value: Any) -> bytes:
    """One server-sent event carrying ``value``."""
    return b"data: " + dumps(value) + b"\n\n"


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def usage(u: pb.Usage) -> dict[str, Any]:
    """OpenAI's usage object (with reasoning and cached token details)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def stop_reason(f: pb.Finished) -> str | int | None:
    """vLLM's ``stop_reason``: the matched stop string or token id."""
    if f.matched_stop:
        return f.matched_stop
    return f.matched_stop_token_id if f.HasField("matched_stop_token_id") else None


def chat_logprobs(entries: list[pb.TokenLogprob]) -> dict[str, Any]:
    """Chat-format logprobs of some tokens."""

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode())}

    content = [
        {**one(e.token, e.logprob), "top_logprobs": [one(t.token, t.logprob) for t in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    """Completions-format (legacy) logprobs, text offsets counted from ``offset``."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [{t.token: _logprob(t.logprob) for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def call_dict(call: pb.ToolCall) -> dict[str, Any]:
    """A complete tool call."""
    function = {"name": call.name, "arguments": call.arguments_json}
    return {"id": call.id, "type": "function", "function": function}


@dataclass
class _Call:
    """What a stream has sent of one tool call."""

    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Envelope:
    """What every chunk and response of one request repeats."""

    kind: str
    """``chat.completion`` or ``text_completion``."""
    request_id: str
    model: str
    token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        """The response id (OpenAI's prefix, then the request id Abort takes)."""
        prefix = "chatcmpl-" if self.kind == "chat.completion" else "cmpl-"
        return prefix + self.request_id

    def wrap(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        """A chunk or response holding ``choices``."""
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


class ChatStream:
    """Events of one chat request as ``chat.completion.chunk`` objects."""

    def __init__(self, envelope: Envelope, logprobs: bool, include_usage: bool) -> None:
        self.envelope = envelope
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._role_sent: set[int] = set()
        self._calls: dict[tuple[int, int], _Call] = {}

    def chunks(self, event: pb.ChatEvent) -> list[dict[str, Any]]:
        """The chunks ``event`` stands for (none for Started, or Usage when not asked)."""
        kind = event.WhichOneof("event")
        if kind == "delta":
            choice = self._delta(event.delta)
            return [] if choice is None else [self._chunk([choice])]
        if kind == "finished":
            return [self._chunk(c) for c in self._finish(event.finished)]
        if kind == "usage" and self.include_usage:
            return [{**self._chunk([]), "usage": usage(event.usage)}]
        return []

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self.envelope.wrap(choices, "chat.completion.chunk")

    def _delta(self, d: pb.Delta) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning"] = delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        calls = self._call_deltas(d.index, d.tool_calls)
        if calls:
            delta["tool_calls"] = calls
        extra = (self.logprobs and d.logprobs) or (self.envelope.token_ids and d.token_ids)
        if not delta and not extra:
            return None  # only markup the parser consumed
        choice = self._choice(d.index, delta)
        if self.logprobs:
            choice["logprobs"] = chat_logprobs(list(d.logprobs))
        if self.envelope.token_ids:
            choice["token_ids"] = list(d.token_ids)
        return choice

    def _choice(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        if index not in self._role_sent:
            self._role_sent.add(index)
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def _call_deltas(
        self, choice: int, fragments: Sequence[pb.ToolCallDelta]
    ) -> list[dict[str, Any]]:
        """One entry per call: fragments merged on the way (a slow reader gets several)."""
        out: list[dict[str, Any]] = []
        for c in fragments:
            entry = self._call_delta(choice, c)
            last = out[-1] if out else None
            if last is not None and last["index"] == c.index and "id" not in entry:
                last["function"]["arguments"] += c.arguments_fragment
            else:
                out.append(entry)
        return out

    def _call_delta(self, choice: int, c: pb.ToolCallDelta) -> dict[str, Any]:
        sent = self._calls.setdefault((choice, c.index), _Call())
        sent.arguments += c.arguments_fragment
        out: dict[str, Any] = {"index": c.index}
        if c.id or c.name:
            sent.id, sent.name = c.id or sent.id, c.name or sent.name
            out.update(id=c.id, type="function")
            out["function"] = {"name": c.name, "arguments": c.arguments_fragment}
        else:
            out["function"] = {"arguments": c.arguments_fragment}
        return out

    def _finish(self, f: pb.Finished) -> list[list[dict[str, Any]]]:
        """The rest of each complete call not yet streamed, then the finish reason."""
        out = []
        for k, call in enumerate(f.tool_calls):
            sent = self._calls.get((f.index, k))
            if sent is None:
                rest: dict[str, Any] = {"index": k, **call_dict(call)}
            elif call.arguments_json.startswith(sent.arguments) and len(call.arguments_json) > len(
                sent.arguments
            ):
                rest = {
                    "index": k,
                    "function": {"arguments": call.arguments_json[len(sent.arguments) :]},
                }
            else:
                continue
            out.append([self._choice(f.index, {"tool_calls": [rest]})])
        last = self._choice(f.index, {})
        last["finish_reason"] = FINISH_REASONS.get(f.reason, "stop")
        last["stop_reason"] = stop_reason(f)
        out.append([last])
        return out


class CompletionStream:
    """Events of one completion request as ``text_completion`` chunks."""

    def __init__(self, envelope: Envelope, logprobs: bool, include_usage: bool) -> None:
        self.envelope = envelope
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._offsets: dict[int, int] = {}

    def chunks(self, event: pb.ChatEvent) -> list[dict[str, Any]]:
        """The chunks ``event`` stands for."""
        kind = event.WhichOneof("event")
        if kind == "delta":
            d = event.delta
            extra = (self.logprobs and d.logprobs) or (self.envelope.token_ids and d.token_ids)
            if not (d.content or extra):
                return []
            choice = self._choice(d.index, d.content)
            if self.logprobs:
                offset = self._offsets.get(d.index, 0)
                choice["logprobs"] = completion_logprobs(list(d.logprobs), offset)
            self._offsets[d.index] = self._offsets.get(d.index, 0) + len(d.content)
            if self.envelope.token_ids:
                choice["token_ids"] = list(d.token_ids)
            return [self._chunk([choice])]
        if kind == "finished":
            choice = self._choice(event.finished.index, "")
            choice["finish_reason"] = FINISH_REASONS.get(event.finished.reason, "stop")
            choice["stop_reason"] = stop_reason(event.finished)
            return [self._chunk([choice])]
        if kind == "usage" and self.include_usage:
            return [{**self._chunk([]), "usage": usage(event.usage)}]
        return []

    @staticmethod
    def _choice(index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self.envelope.wrap(choices, "text_completion")
