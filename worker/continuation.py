"""Continue a stream that began on a worker that died.

The router resubmits the request with the tokens its client already received
(``Job.continuation_token_ids``). Here the prompt is extended by those tokens,
the output budget shrinks by as many, and the choice's parser replays them
silently so the next delta lands in the right section (reasoning, content or
tool call) with no text repeated or lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qwen_serve.errors import FAILED_PRECONDITION, RequestError
from worker.events import RequestStream


class TokenizerLike(Protocol):
    """What is used of the engine's tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str:
        """Text of ``ids``."""
        ...


@dataclass
class _Replayed:
    """A CompletionOutput stand-in carrying the already-delivered tokens."""

    text: str
    token_ids: list[int]
    index: int = 0
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: Any = None


def apply(
    prompt: dict[str, Any],
    params: Any,
    stream: RequestStream,
    delivered: list[int],
    tokenizer: TokenizerLike,
) -> None:
    """Turn a prepared request into the continuation after ``delivered`` tokens."""
    if params.n != 1:
        raise RequestError(FAILED_PRECONDITION, "", "only single-choice streams can be continued")
    remaining = (params.max_tokens or 0) - len(delivered)
    if params.max_tokens is not None and remaining < 1:
        raise RequestError(FAILED_PRECONDITION, "", "nothing is left to generate")
    prompt_ids = list(prompt["prompt_token_ids"])
    choice = stream.choices[0]
    logprobs, choice.top_logprobs = choice.top_logprobs, None
    skip = bool(getattr(params, "skip_special_tokens", True))
    text = tokenizer.decode(delivered, skip_special_tokens=skip)
    choice.feed(_Replayed(text=text, token_ids=list(delivered)), prompt_ids)
    choice.top_logprobs = logprobs
    prompt["prompt_token_ids"] = prompt_ids + list(delivered)
    stream.continued_tokens = len(delivered)
    if params.max_tokens is not None:
        params.max_tokens = remaining
    if params.min_tokens:
        params.min_tokens = max(0, params.min_tokens - len(delivered))
