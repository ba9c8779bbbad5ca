"""A request's events folded into one non-streamed ``chat.completion`` or completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb
from router.openai import chunks


@dataclass
class _Choice:
    reasoning: str = ""
    content: str = ""
    fragments: dict[int, pb.ToolCall] = field(default_factory=dict)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finished: pb.Finished | None = None

    def add(self, d: pb.Delta) -> None:
        self.reasoning += d.reasoning
        self.content += d.content
        self.logprobs.extend(d.logprobs)
        self.token_ids.extend(d.token_ids)
        for c in d.tool_calls:
            call = self.fragments.setdefault(c.index, pb.ToolCall())
            call.id, call.name = call.id or c.id, call.name or c.name
            call.arguments_json += c.arguments_fragment

    def calls(self) -> list[dict[str, Any]]:
        """Complete calls; a call cut short (no Finished call) as far as it streamed."""
        done = list(self.finished.tool_calls) if self.finished is not None else []
        calls = done or [self.fragments[k] for k in sorted(self.fragments)]
        return [chunks.call_dict(c) for c in calls]

    def end(self, out: dict[str, Any], envelope: chunks.Envelope) -> dict[str, Any]:
        f = self.finished or pb.Finished(reason=pb.FINISH_REASON_STOP)
        out["finish_reason"] = chunks.FINISH_REASONS.get(f.reason, "stop")
        out["stop_reason"] = chunks.stop_reason(f)
        if envelope.token_ids:
            out["token_ids"] = self.token_ids
        return out


class Folded:
    """Gathers every event of one request."""

    def __init__(self, envelope: chunks.Envelope, logprobs: bool) -> None:
        self.envelope = envelope
        self.logprobs = logprobs
        self.usage = pb.Usage()
        self._choices: dict[int, _Choice] = {}

    def add(self, event: pb.ChatEvent) -> None:
        """Take one event (Started and Error are handled by the caller)."""
        kind = event.WhichOneof("event")
        if kind == "delta":
            self._choice(event.delta.index).add(event.delta)
        elif kind == "finished":
            self._choice(event.finished.index).finished = event.finished
        elif kind == "usage":
            self.usage = event.usage

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    def _ordered(self) -> list[tuple[int, _Choice]]:
        return sorted(self._choices.items())

    def chat(self) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        choices = []
        for index, c in self._ordered():
            calls = c.calls()
            message: dict[str, Any] = {
                "role": "assistant",
                "content": c.content or (None if calls else ""),
                "reasoning": c.reasoning or None,
                "reasoning_content": c.reasoning or None,
            }
            if calls:
                message["tool_calls"] = calls
            logprobs = chunks.chat_logprobs(c.logprobs) if self.logprobs else None
            choice = {"index": index, "message": message, "logprobs": logprobs}
            choices.append(c.end(choice, self.envelope))
        out = self.envelope.wrap(choices, "chat.completion")
        out["usage"] = chunks.usage(self.usage)
        return out

    def completion(self) -> dict[str, Any]:
        """The ``text_completion`` object."""
        choices = []
        for index, c in self._ordered():
            logprobs = chunks.completion_logprobs(c.logprobs, 0) if self.logprobs else None
            choice = {"index": index, "text": c.content, "logprobs": logprobs}
            choices.append(c.end(choice, self.envelope))
        out = self.envelope.wrap(choices, "text_completion")
        out["usage"] = chunks.usage(self.usage)
        return out
