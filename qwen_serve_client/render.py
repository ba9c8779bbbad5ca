"""Terminal output of the CLI: streamed text on stdout, status on stderr, or JSON lines.

Human mode writes the model's output to stdout (reasoning dimmed on a
terminal, then content and tool calls, choice 0 live and other choices at the
end) and a status line to stderr: finish reason, usage and timing. JSON mode
writes one object per event to stdout, then a ``{"type": "timing"}`` object.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from qwen_serve_client.events import (
    Delta,
    Event,
    Finished,
    StreamError,
    Usage,
    to_dict,
)
from qwen_serve_client.result import Accumulator, ChatResult


@dataclass(frozen=True)
class Style:
    """ANSI styles (all empty without colour)."""

    dim: str = ""
    bold: str = ""
    cyan: str = ""
    red: str = ""
    reset: str = ""

    @classmethod
    def for_stream(cls, stream: TextIO, mode: str) -> Style:
        """Colour when ``mode`` is "always", or "auto" on a terminal without NO_COLOR."""
        on = mode == "always" or (
            mode == "auto" and stream.isatty() and not os.environ.get("NO_COLOR")
        )
        if not on:
            return cls()
        return cls("\033[2m", "\033[1m", "\033[36m", "\033[31m", "\033[0m")


@dataclass
class Timing:
    """Wall-clock marks of one call."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    end: float | None = None

    def summary(self, usage: Usage | None) -> dict[str, float]:
        """Seconds to the first token, total seconds and decode tokens per second."""
        end = self.end or time.monotonic()
        out = {"total_s": round(end - self.start, 4)}
        if self.first_token is not None:
            out["first_token_s"] = round(self.first_token - self.start, 4)
            decode = end - self.first_token
            if usage is not None and usage.completion_tokens > 1 and decode > 0:
                out["tokens_per_s"] = round((usage.completion_tokens - 1) / decode, 1)
        return out


class Renderer:
    """Prints events as they arrive and folds them into a result."""

    def __init__(
        self,
        *,
        json_lines: bool = False,
        color: str = "auto",
        show_reasoning: bool = True,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.json_lines = json_lines
        self.show_reasoning = show_reasoning
        self.style = Style.for_stream(self.out, color)
        self.err_style = Style.for_stream(self.err, color)
        self.acc = Accumulator()
        self.timing = Timing()
        self._in_reasoning = False
        self._at_line_start = True

    @property
    def result(self) -> ChatResult:
        """Everything received so far."""
        return self.acc.result

    def event(self, event: Event) -> None:
        """Print and fold one event."""
        self.acc.add(event)
        if isinstance(event, Delta) and self.timing.first_token is None:
            self.timing.first_token = time.monotonic()
        if self.json_lines:
            self._line(json.dumps(to_dict(event), ensure_ascii=False))
        elif isinstance(event, Delta) and event.index == 0:
            self._delta(event)
        elif isinstance(event, Finished):
            self._finished(event)
        elif isinstance(event, StreamError):
            self._newline()
            s = self.err_style
            print(f"{s.red}error{s.reset} {event.status.name}: {event.message}", file=self.err)

    def done(self) -> None:
        """The end of the stream: timing and usage."""
        self.timing.end = time.monotonic()
        timing = self.timing.summary(self.result.usage)
        if self.json_lines:
            self._line(json.dumps({"type": "timing", **timing}))
            return
        self._newline()
        for choice in self.result.choices[1:]:
            print(f"{self.style.bold}--- choice {choice.index}{self.style.reset}", file=self.out)
            print(choice.content, file=self.out)
        print(self._status(timing), file=self.err)

    def _status(self, timing: dict[str, float]) -> str:
        s, r = self.err_style, self.result
        parts = [f"finished: {r.finish_reason or 'incomplete'}"]
        if r.usage is not None:
            u = r.usage
            parts.append(
                f"tokens: prompt {u.prompt_tokens}, completion {u.completion_tokens} "
                f"(reasoning {u.reasoning_tokens}), cached {u.cached_tokens}"
            )
        clock = [f"total {timing['total_s']:.2f} s"]
        if "first_token_s" in timing:
            clock.insert(0, f"first token {timing['first_token_s']:.2f} s")
        if "tokens_per_s" in timing:
            clock.append(f"{timing['tokens_per_s']:.0f} tok/s")
        parts.append(", ".join(clock))
        return f"{s.dim}{' · '.join(parts)} · {r.request_id}{s.reset}"

    def _delta(self, delta: Delta) -> None:
        s = self.style
        if delta.reasoning and self.show_reasoning:
            self._in_reasoning = True
            self._write(f"{s.dim}{delta.reasoning}{s.reset}")
        if delta.content:
            if self._in_reasoning:
                self._in_reasoning = False
                self._newline()
            self._write(delta.content)
        for fragment in delta.tool_calls:
            if fragment.name:
                self._newline()
                self._write(f"{s.cyan}{s.bold}tool call{s.reset} {s.cyan}{fragment.name}{s.reset} ")
            self._write(f"{s.cyan}{fragment.arguments_fragment}{s.reset}")

    def _finished(self, finished: Finished) -> None:
        if finished.index != 0 or not finished.tool_calls:
            return
        self._newline()
        for call in finished.tool_calls:
            s = self.err_style
            print(f"{s.dim}  (call {call.name} id {call.id}){s.reset}", file=self.err)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self._at_line_start:
            self._write("\n")

    def _line(self, text: str) -> None:
        print(text, file=self.out, flush=True)
