"""One choice's vLLM outputs -> API events, through vLLM's own parser.

A :class:`ChoiceStream` feeds each ``CompletionOutput`` delta of its choice through
a per-choice vLLM ``Parser`` (``parse_delta``: qwen3 reasoning + qwen3_coder tool
calls), turns the resulting ``DeltaMessage`` into a ``Delta`` event, and adds the
``Finished`` event with the complete tool calls when the choice ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid
from worker.event_parts import (
    ToolCallState,
    complete_tool_calls,
    finish_reason,
    finished_event,
    token_logprobs,
    tool_call_deltas,
)

logger = logging.getLogger(__name__)

UNSATISFIABLE: Final = (
    "no output can satisfy this constraint: the engine's grammar rejected every token "
    "the model could produce"
)


class ParserLike(Protocol):
    """What is used of ``vllm.parser.abstract_parser.Parser``."""

    def parse_delta(
        self,
        delta_text: str,
        delta_token_ids: list[int],
        request: Any,
        prompt_token_ids: list[int] | None = None,
        *,
        finished: bool,
    ) -> Any:
        """DeltaMessage (content, reasoning, tool_calls) or None."""


class ReasoningCounterLike(Protocol):
    """Counts a choice's reasoning tokens (``worker.vllm_boundary.ReasoningCounter``)."""

    def feed(self, new_ids: Sequence[int], prompt_ids: Sequence[int] | None) -> None:
        """Account for the next token ids of the choice (the prompt's ids given)."""

    def count(self) -> int:
        """Reasoning tokens so far."""


class OutputLike(Protocol):
    """What is used of ``vllm.outputs.CompletionOutput``."""

    @property
    def index(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def logprobs(self) -> Any: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def stop_reason(self) -> int | str | None: ...


@dataclass
class ChoiceStream:
    """Converts the outputs of one choice into events.

    ``parser`` is a per-choice vLLM ``Parser`` instance (None passes text through
    as content) and ``request`` the vLLM ``ChatCompletionRequest`` it parses for
    (tool_choice, tools).
    """

    index: int
    parser: ParserLike | None = None
    request: Any = None
    top_logprobs: int | None = None
    """None: no logprobs; otherwise alternatives per token (0 for none)."""
    stop_token_ids: frozenset[int] = frozenset()
    """The request's stop token ids: only these are reported as matched (not EOS ids)."""
    call_end_id: int | None = None
    """Token id of ``TOOL_CALL_END``; None when unknown (then JSON completeness decides)."""
    token_ids: list[int] = field(default_factory=list)
    calls: dict[int, ToolCallState] = field(default_factory=dict)
    finished: bool = False
    detokenize: Callable[[list[int]], str] | None = None
    """Text of new token ids in place of the engine's (set for a continuation)."""
    reasoning: ReasoningCounterLike | None = None
    """Counts the reasoning tokens for usage; None: the choice has no reasoning."""
    constraint: str | None = None
    """The request field whose grammar constrains the output (``constraint_field``)."""

    def feed(self, output: OutputLike, prompt_token_ids: list[int] | None) -> list[pb.ChatEvent]:
        """Events for one delta output of this choice (a Delta and, at the end, Finished)."""
        if self.finished:
            return []
        new_ids = list(output.token_ids)
        self.token_ids.extend(new_ids)
        if self.reasoning is not None:
            self.reasoning.feed(new_ids, prompt_token_ids)
        done = output.finish_reason is not None
        events = []
        delta = self._delta(output, new_ids, prompt_token_ids, done)
        if delta is not None:
            events.append(pb.ChatEvent(delta=delta))
        if done:
            self.finished = True
            if output.finish_reason == "error" and self.constraint:
                # With our engine settings vLLM fails a request only when its grammar
                # rejects a sampled token: the constraint allows nothing from here on.
                raise invalid(self.constraint, UNSATISFIABLE)
            stop = output.stop_reason
            if isinstance(stop, int) and stop not in self.stop_token_ids:
                stop = None  # an end-of-sequence id from the generation config
            # Only a natural end of sequence finishes an open call; anything else cuts it.
            calls = self.complete_calls(cut=output.finish_reason != "stop" or stop is not None)
            reason = finish_reason(output.finish_reason, bool(calls))
            events.append(finished_event(self.index, reason, stop, calls))
        return events

    def complete_calls(self, cut: bool) -> list[pb.ToolCall]:
        """The choice's tool calls with complete JSON arguments.

        ``cut``: generation was stopped from outside (max_tokens, a stop, an abort), so a
        call the model did not close with ``call_end_id`` is left out.
        """
        closed = None
        if cut and self.call_end_id is not None:
            closed = self.token_ids.count(self.call_end_id)
        return complete_tool_calls(self.calls, closed)

    def reasoning_tokens(self) -> int:
        """Reasoning tokens of this choice so far (what the parser streamed as reasoning)."""
        return 0 if self.reasoning is None else self.reasoning.count()

    def _delta(
        self, output: OutputLike, new_ids: list[int], prompt_ids: list[int] | None, done: bool
    ) -> pb.Delta | None:
        text = output.text if self.detokenize is None else self.detokenize(new_ids)
        message = self._parse(text, new_ids, prompt_ids, done)
        delta = pb.Delta(index=self.index, token_ids=new_ids)
        if message is not None:
            delta.reasoning = message.reasoning or ""
            delta.content = message.content or ""
            delta.tool_calls.extend(tool_call_deltas(message.tool_calls or (), self.calls))
        if self.top_logprobs is not None and new_ids:
            delta.logprobs.extend(token_logprobs(new_ids, output.logprobs or (), self.top_logprobs))
        if not (new_ids or delta.reasoning or delta.content or delta.tool_calls):
            return None
        return delta

    def _parse(self, text: str, ids: list[int], prompt_ids: list[int] | None, done: bool) -> Any:
        if self.parser is None:
            return _Text(text) if text else None
        if not text and not ids and not done:
            return None
        try:
            return self.parser.parse_delta(text, ids, self.request, prompt_ids, finished=done)
        except Exception:
            logger.exception("parser failed on choice %d; passing the text through", self.index)
            return _Text(text) if text else None


@dataclass
class _Text:
    """A DeltaMessage stand-in for unparsed text."""

    content: str
    reasoning: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
