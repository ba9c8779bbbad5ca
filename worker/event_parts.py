"""API event parts from vLLM values: tool-call fragments, logprobs, finish reasons, usage.

Small pure functions used by ``worker/choice_stream.py`` and ``worker/events.py``;
nothing here talks to the engine or holds state beyond what it is handed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INTERNAL, RequestError

logger = logging.getLogger(__name__)

FINISH_REASONS: Final[Mapping[str, int]] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "repetition": pb.FINISH_REASON_STOP,
}
"""vLLM ``CompletionOutput.finish_reason`` -> API reason ("error" raises instead)."""


@dataclass
class ToolCallState:
    """One tool call of a choice, accumulated from its fragments."""

    id: str = ""
    name: str = ""
    arguments: str = ""


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
