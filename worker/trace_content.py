"""What a traced job's GenAI span records of its content, when ``trace_content`` is on:
``gen_ai.input.messages`` and ``gen_ai.output.messages`` in the semantic conventions' JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qwen_serve import telemetry
from qwen_serve.api.v1 import serve_pb2 as pb


def input_messages(request: telemetry.Request) -> str:
    """``gen_ai.input.messages`` as JSON (images as placeholders). Only when content is on."""
    if isinstance(request, pb.GenerateRequest):
        if request.WhichOneof("prompt") == "text":
            part: dict[str, Any] = {"type": "text", "content": request.text}
        else:
            part = {"type": "token_ids", "content": list(request.token_ids.ids)}
        return json.dumps([{"role": "user", "parts": [part]}], ensure_ascii=False)
    messages = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        if message.reasoning:
            parts.append({"type": "reasoning", "content": message.reasoning})
        for content in message.content:
            if content.WhichOneof("part") == "text":
                parts.append({"type": "text", "content": content.text})
            else:
                parts.append({"type": "image", "mime_type": content.image.mime_type})
        for call in message.tool_calls:
            parts.append({"type": "tool_call", "id": call.id, "name": call.name})
        role = pb.Role.Name(message.role).removeprefix("ROLE_").lower()
        messages.append({"role": role, "parts": parts})
    return json.dumps(messages, ensure_ascii=False)


@dataclass
class OutputText:
    """Collects a stream's output per choice for ``gen_ai.output.messages``."""

    texts: dict[tuple[int, str], str] = field(default_factory=dict)
    ends: dict[int, pb.Finished] = field(default_factory=dict)

    def add(self, event: pb.ChatEvent) -> None:
        """Take the text of a Delta, the tool calls and reason of a Finished."""
        if event.HasField("delta"):
            delta = event.delta
            for kind, text in (("reasoning", delta.reasoning), ("text", delta.content)):
                if text:
                    key = (delta.index, kind)
                    self.texts[key] = self.texts.get(key, "") + text
        elif event.HasField("finished"):
            self.ends[event.finished.index] = event.finished

    def json(self) -> str:
        """The collected output as semantic-convention output messages."""
        out = []
        for index in sorted({i for i, _ in self.texts} | set(self.ends)):
            parts: list[dict[str, Any]] = [
                {"type": kind, "content": self.texts[(index, kind)]}
                for kind in ("reasoning", "text")
                if (index, kind) in self.texts
            ]
            end = self.ends.get(index)
            calls = end.tool_calls if end is not None else []
            parts += [
                {"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments_json}
                for c in calls
            ]
            reason = telemetry.finish_reason(end) if end is not None else ""
            out.append({"role": "assistant", "parts": parts, "finish_reason": reason})
        return json.dumps(out, ensure_ascii=False)
