"""vLLM outputs -> API events (Delta, Finished, Usage), per request.

A :class:`RequestStream` holds one ``ChoiceStream`` per choice
(``worker/choice_stream.py``, which runs vLLM's own parser) and feeds each
``RequestOutput`` to them; closing it finishes open choices and adds the Usage
event. The event parts themselves are built in ``worker/event_parts.py``.
Nothing here talks to the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from worker.choice_stream import ChoiceStream, ParserLike, ReasoningCounterLike
from worker.event_parts import finished_event, usage_event

TOOL_CALL_END: Final = "</tool_call>"
"""The token that closes a qwen3_coder tool call: a call without it was cut off."""


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
