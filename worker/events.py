"""vLLM outputs -> API events (Delta, Finished, Usage).

One :class:`ChoiceStream` per choice feeds each ``CompletionOutput`` delta through
vLLM's own parser (``Parser.parse_delta``: qwen3 reasoning + qwen3_coder tool
calls) and turns the resulting ``DeltaMessage`` into ``Delta`` events; when the
choice finishes it adds a ``Finished`` event with the complete tool calls. The
rest are small pure functions. Nothing here talks to the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INTERNAL, RequestError, invalid

logger = logging.getLogger(__name__)

FINISH_REASONS: Final[Mapping[str, int]] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "repetition": pb.FINISH_REASON_STOP,
}
"""vLLM ``CompletionOutput.finish_reason`` -> API reason ("error" raises instead)."""
UNSATISFIABLE: Final = (
    "no output can satisfy this constraint: the engine's grammar rejected every token "
    "the model could produce"
)
TOOL_CALL_END: Final = "</tool_call>"
"""The token that closes a qwen3_coder tool call: a call without it was cut off."""


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
class ToolCallState:
    """One tool call of a choice, accumulated from its fragments."""

    id: str = ""
    name: str = ""
    arguments: str = ""


# ------------------------------------------------------------------ pure functions


def tool_call_deltas(
    fragments: Iterable[Any], calls: dict[int, ToolCallState]
) -> list[pb.ToolCallDelta]:
    """API fragments for vLLM ``DeltaToolCall`` items, accumulated into ``calls``."""
    out = []
    for fragment in fragments:
        state = calls.setdefault(fragment.index, ToolCallState())
        function = fragment.function
        name = (function.name if function is not None else None) or ""
        arguments = (function.arguments if function is not None else None) or ""
        call_id = fragment.id or ""
        if call_id and not state.id:
            state.id = call_id
        if name and not state.name:
            state.name = name
        state.arguments += arguments
        out.append(
            pb.ToolCallDelta(
                index=fragment.index, id=call_id, name=name, arguments_fragment=arguments
            )
        )
    return out


def token_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any] | None], top: int
) -> list[pb.TokenLogprob]:
    """API logprobs of the sampled tokens, with up to ``top`` alternatives by rank."""
    out = []
    for position, token_id in enumerate(token_ids):
        entries = logprobs[position] if position < len(logprobs) else None
        entries = entries or {}
        sampled = entries.get(token_id)
        item = pb.TokenLogprob(token_id=token_id)
        if sampled is not None:
            item.token = sampled.decoded_token or ""
            item.logprob = max(sampled.logprob, -9999.0)
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= top),
            key=lambda pair: pair[1].rank,
        )
        for tid, lp in ranked:
            item.top.append(
                pb.TopLogprob(
                    token_id=tid, token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0)
                )
            )
        out.append(item)
    return out


def finish_reason(reason: str | None, called_tools: bool) -> int:
    """API finish reason; a stop after complete tool calls is TOOL_CALLS."""
    if reason == "error":
        raise RequestError(INTERNAL, "", "the engine failed this request", retryable=True)
    mapped = FINISH_REASONS.get(reason or "stop", pb.FINISH_REASON_STOP)
    if mapped == pb.FINISH_REASON_STOP and called_tools:
        return pb.FINISH_REASON_TOOL_CALLS
    return mapped


def complete_tool_calls(
    calls: Mapping[int, ToolCallState], closed: int | None = None
) -> list[pb.ToolCall]:
    """Tool calls whose arguments are a complete JSON object, in index order.

    ``closed`` is how many calls the model closed (``TOOL_CALL_END`` tokens): later ones
    were cut off (by max_tokens, a stop or an abort) and are left out. None skips that check.
    """
    out = []
    for position, index in enumerate(sorted(calls)):
        call = calls[index]
        if closed is not None and position >= closed:
            logger.info("dropping unterminated tool call %d (%s)", index, call.name or "no name")
            continue
        arguments = call.arguments or "{}"
        try:
            complete = isinstance(json.loads(arguments), dict)
        except (ValueError, RecursionError):
            complete = False
        if not complete or not call.name:
            logger.info("dropping incomplete tool call %d (%s)", index, call.name or "no name")
            continue
        out.append(pb.ToolCall(id=call.id, name=call.name, arguments_json=arguments))
    return out


def finished_event(
    index: int, reason: int, stop_reason: int | str | None, tool_calls: Sequence[pb.ToolCall]
) -> pb.ChatEvent:
    """The Finished event of one choice (``stop_reason`` from ``CompletionOutput``)."""
    finished = pb.Finished(index=index, reason=reason, tool_calls=tool_calls)  # type: ignore[arg-type]
    if isinstance(stop_reason, str):
        finished.matched_stop = stop_reason
    elif isinstance(stop_reason, int):
        finished.matched_stop_token_id = stop_reason
    return pb.ChatEvent(finished=finished)


def usage_event(prompt: int, completion: int, reasoning: int, cached: int) -> pb.ChatEvent:
    """The Usage event."""
    usage = pb.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        cached_tokens=cached,
    )
    return pb.ChatEvent(usage=usage)


# ------------------------------------------------------------------ per choice


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


# ------------------------------------------------------------------ per request


class RequestOutputLike(Protocol):
    """What is used of ``vllm.outputs.RequestOutput``."""

    @property
    def prompt_token_ids(self) -> Sequence[int] | None: ...
    @property
    def num_cached_tokens(self) -> int | None: ...
    @property
    def outputs(self) -> Sequence[Any]: ...


@dataclass
class RequestStream:
    """Converts the outputs of one request (all its choices) into events."""

    choices: list[ChoiceStream]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    closed: bool = False
    continued_tokens: int = 0
    """Tokens an earlier attempt delivered, appended to the prompt (worker/continuation.py)."""

    def feed(self, output: RequestOutputLike) -> list[pb.ChatEvent]:
        """Events for one ``RequestOutput`` (DELTA kind)."""
        if output.prompt_token_ids is not None:
            self.prompt_token_ids = list(output.prompt_token_ids)
            self.prompt_tokens = len(self.prompt_token_ids) - self.continued_tokens
        self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens or 0)
        events: list[pb.ChatEvent] = []
        for choice_output in output.outputs:
            choice = self.choices[choice_output.index]
            events.extend(choice.feed(choice_output, self.prompt_token_ids))
        return events

    def close(self) -> list[pb.ChatEvent]:
        """Finished (ABORT) for any choice still open, then the one Usage event."""
        if self.closed:
            return []
        self.closed = True
        events = [
            finished_event(c.index, pb.FINISH_REASON_ABORT, None, c.complete_calls(cut=True))
            for c in self.choices
            if not c.finished
        ]
        events.append(self.usage())
        return events

    def usage(self) -> pb.ChatEvent:
        """Token counts over all choices."""
        return usage_event(
            self.prompt_tokens,
            sum(len(c.token_ids) for c in self.choices),
            sum(c.reasoning_tokens() for c in self.choices),
            self.cached_tokens,
        )


def request_stream(
    parsers: Sequence[ParserLike | None],
    request: Any,
    sampling: pb.SamplingParams,
    call_end_id: int | None,
    counters: Sequence[ReasoningCounterLike | None] = (),
    constraint: str | None = None,
) -> RequestStream:
    """A RequestStream with one choice per parser (None: text passes through as content).

    ``counters`` count each choice's reasoning tokens (none given: no reasoning counted);
    ``constraint`` names the field of the output constraint, if the request has one.
    """
    top = (
        (sampling.top_logprobs if sampling.HasField("top_logprobs") else 0)
        if sampling.logprobs
        else None
    )
    stop_ids = frozenset(sampling.stop_token_ids)
    return RequestStream(
        [
            ChoiceStream(
                i,
                p,
                request,
                top_logprobs=top,
                stop_token_ids=stop_ids,
                call_end_id=call_end_id,
                reasoning=counters[i] if i < len(counters) else None,
                constraint=constraint,
            )
            for i, p in enumerate(parsers)
        ]
    )
