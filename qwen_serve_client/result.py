"""Accumulating a stream of events into a final result.

:class:`Accumulator` folds events as they arrive (the CLI prints and folds at the
same time); :func:`accumulate` does it for a whole iterable. The result's
:meth:`ChatResult.message` is the assistant turn to append to the conversation.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client.content import assistant
from qwen_serve_client.errors import StreamFailed
from qwen_serve_client.events import (
    Delta,
    Event,
    Finished,
    FinishReason,
    Started,
    StreamError,
    ToolCall,
    Usage,
)


@dataclass
class Choice:
    """One choice's output, put together from its deltas and its Finished event."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str = ""
    token_ids: list[int] = field(default_factory=list)
    # Fragments by call index, for calls the stream cut short (no Finished tool call).
    _partial: dict[int, list[str]] = field(default_factory=dict, repr=False)

    def message(self) -> pb.Message:
        """This choice as an assistant message for the next turn."""
        return assistant(self.content, self.tool_calls, self.reasoning)


@dataclass
class ChatResult:
    """A whole stream: request id, choices, usage, and the error if it failed."""

    request_id: str = ""
    client_request_id: str = ""
    model: str = ""
    choices: list[Choice] = field(default_factory=list)
    usage: Usage | None = None
    error: StreamError | None = None

    def choice(self, index: int = 0) -> Choice:
        """Choice ``index`` (an empty one if the stream had none)."""
        for c in self.choices:
            if c.index == index:
                return c
        return Choice(index)

    @property
    def content(self) -> str:
        """Content of choice 0."""
        return self.choice(0).content

    @property
    def reasoning(self) -> str:
        """Reasoning of choice 0."""
        return self.choice(0).reasoning

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Complete tool calls of choice 0."""
        return self.choice(0).tool_calls

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why choice 0 ended (None if it never finished)."""
        return self.choice(0).finish_reason

    def message(self, index: int = 0) -> pb.Message:
        """Choice ``index`` as an assistant message for the next turn."""
        return self.choice(index).message()

    def raise_for_error(self) -> ChatResult:
        """Raise :class:`StreamFailed` if the stream ended with an error; else return self."""
        if self.error is not None:
            raise StreamFailed(self.error, self.request_id)
        return self


class Accumulator:
    """Folds events, one at a time, into a :class:`ChatResult`."""

    def __init__(self) -> None:
        self.result = ChatResult()

    def _choice(self, index: int) -> Choice:
        for c in self.result.choices:
            if c.index == index:
                return c
        created = Choice(index)
        self.result.choices.append(created)
        self.result.choices.sort(key=lambda c: c.index)
        return created

    def add(self, event: Event) -> None:
        """Fold one event in."""
        if isinstance(event, Started):
            self.result.request_id = event.request_id
            self.result.client_request_id = event.client_request_id
            self.result.model = event.model
        elif isinstance(event, Delta):
            choice = self._choice(event.index)
            choice.reasoning += event.reasoning
            choice.content += event.content
            choice.token_ids.extend(event.token_ids)
            for fragment in event.tool_calls:
                pieces = choice._partial.setdefault(fragment.index, ["", "", ""])
                pieces[0] = pieces[0] or fragment.id
                pieces[1] = pieces[1] or fragment.name
                pieces[2] += fragment.arguments_fragment
        elif isinstance(event, Finished):
            choice = self._choice(event.index)
            choice.finish_reason = event.reason
            choice.matched_stop = event.matched_stop
            choice.tool_calls = list(event.tool_calls)
        elif isinstance(event, Usage):
            self.result.usage = event
        elif isinstance(event, StreamError):
            self.result.error = event

    def partial_tool_calls(self, index: int = 0) -> list[ToolCall]:
        """Tool calls of choice ``index`` as streamed so far (may be incomplete)."""
        choice = self._choice(index)
        return [ToolCall(*choice._partial[i]) for i in sorted(choice._partial)]


def accumulate(events: Iterable[Event]) -> ChatResult:
    """Consume ``events`` and return the final result (errors are in ``result.error``)."""
    acc = Accumulator()
    for event in events:
        acc.add(event)
    return acc.result


async def accumulate_async(events: AsyncIterable[Event]) -> ChatResult:
    """Consume an async stream of events and return the final result."""
    acc = Accumulator()
    async for event in events:
        acc.add(event)
    return acc.result
