"""Continue a stream that began on a worker that died.

The router resubmits the request with the tokens its client already received
(``Job.continuation_token_ids``). Here the prompt is extended by those tokens,
the output budget shrinks by as many, and the choice's parser replays them
silently so the next delta lands in the right section (reasoning, content or
tool call) with no text repeated or lost; the choice's text is then decoded
here, token by token, continuing the first attempt's decoder state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import FAILED_PRECONDITION, RequestError
from worker.detokenize import Detokenizer
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
) -> bool:
    """Turn a prepared request into the continuation after ``delivered`` tokens.

    Returns False when the earlier attempt already delivered all ``max_tokens``
    (its worker died before sending Finished): nothing is left to generate, and
    :func:`finish_exhausted` gives the events that end the stream.
    """
    if params.n != 1:
        raise RequestError(FAILED_PRECONDITION, "", "only single-choice streams can be continued")
    remaining = (params.max_tokens or 0) - len(delivered)
    prompt_ids = list(prompt["prompt_token_ids"])
    choice = stream.choices[0]
    logprobs, choice.top_logprobs = choice.top_logprobs, None
    skip = bool(getattr(params, "skip_special_tokens", True))
    text_of = Detokenizer.of(tokenizer, prompt_ids, skip)
    if text_of is None:  # not a fast tokenizer: decode at once
        text = tokenizer.decode(delivered, skip_special_tokens=skip)
    else:
        text = text_of(delivered)
    choice.feed(_Replayed(text=text, token_ids=list(delivered)), prompt_ids)
    choice.detokenize = text_of
    choice.top_logprobs = logprobs
    prompt["prompt_token_ids"] = prompt_ids + list(delivered)
    stream.continued_tokens = len(delivered)
    if params.max_tokens is not None and remaining < 1:
        return False
    if params.max_tokens is not None:
        params.max_tokens = remaining
    if params.min_tokens:
        params.min_tokens = max(0, params.min_tokens - len(delivered))
    return True


@dataclass
class _FinalOutput:
    """A RequestOutput stand-in: the length limit reached with no new token."""

    prompt_token_ids: list[int]
    outputs: list[_Replayed]
    num_cached_tokens: int = 0


def finish_exhausted(prompt: dict[str, Any], stream: RequestStream) -> list[pb.ChatEvent]:
    """Finished (LENGTH) and Usage for a continuation with nothing left to generate."""
    last = _Replayed(text="", token_ids=[], finish_reason="length")
    events = stream.feed(_FinalOutput(list(prompt["prompt_token_ids"]), [last]))
    return events + stream.close()
