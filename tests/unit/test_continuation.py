"""Continuing a stream whose worker died (worker/continuation.py), on the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.tokenizers import get_tokenizer

from qwen_serve.api.v1 import serve_pb2 as pb
from worker import continuation
from worker.events import request_stream


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> continuation.TokenizerLike:
    return get_tokenizer(str(tiny_model))  # type: ignore[no-any-return]


def _stream(max_tokens: int) -> tuple[SamplingParams, object]:
    params = SamplingParams(max_tokens=max_tokens)
    return params, request_stream([None], None, pb.SamplingParams(max_tokens=max_tokens), None)


def test_continuation_extends_the_prompt_and_shrinks_the_budget(
    tokenizer: continuation.TokenizerLike,
) -> None:
    params, stream = _stream(max_tokens=5)
    prompt = {"prompt_token_ids": [11, 12]}
    assert continuation.apply(prompt, params, stream, [300, 301], tokenizer)  # type: ignore[arg-type]
    assert prompt["prompt_token_ids"] == [11, 12, 300, 301]
    assert params.max_tokens == 3


def test_nothing_left_to_generate_ends_with_length_and_full_usage(
    tokenizer: continuation.TokenizerLike,
) -> None:
    """The worker died between the last Delta and Finished: end the stream, do not fail it."""
    params, stream = _stream(max_tokens=3)
    prompt = {"prompt_token_ids": [11, 12]}
    delivered = [300, 301, 302]
    assert not continuation.apply(prompt, params, stream, delivered, tokenizer)  # type: ignore[arg-type]
    events = continuation.finish_exhausted(prompt, stream)  # type: ignore[arg-type]
    assert [e.WhichOneof("event") for e in events] == ["finished", "usage"]
    assert events[0].finished.reason == pb.FINISH_REASON_LENGTH
    usage = events[1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 3)


def _first_attempt_text(tokenizer: object, prompt: list[int], generated: list[int]) -> str:
    """What vLLM's incremental detokenizer streams for ``generated`` after ``prompt``."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=prompt, skip_special_tokens=True)
    backend = tokenizer._tokenizer  # type: ignore[attr-defined]
    return "".join(stream.step(backend, t) or "" for t in generated)


@pytest.mark.parametrize("cut", range(1, 8))
def test_text_continues_exactly_across_an_invalid_utf8_boundary(
    tokenizer: continuation.TokenizerLike, cut: int
) -> None:
    """Whatever text the new engine reports for its first tokens, the client's text is whole.

    Byte tokens such as 94..98 decode to U+FFFD alone; a cut right after one once
    made the continuation repeat the whole earlier text (vLLM's decoder, primed with
    the extended prompt).
    """
    prompt = [11, 12, 13]
    generated = [300, 301, 94, 95, 302, 96, 303, 97, 304, 305]
    params, stream = _stream(max_tokens=len(generated))
    first = _first_attempt_text(tokenizer, prompt, generated[:cut])
    seen = {"prompt_token_ids": list(prompt)}
    assert continuation.apply(seen, params, stream, generated[:cut], tokenizer)  # type: ignore[arg-type]
    parts = [first]
    for i, token in enumerate(generated[cut:], start=cut):
        last = i == len(generated) - 1
        output = continuation._Replayed(
            text="WRONG",  # the engine's text is not used for a continuation
            token_ids=[token],
            finish_reason="length" if last else None,
        )
        for event in stream.feed(continuation._FinalOutput(seen["prompt_token_ids"], [output])):  # type: ignore[attr-defined]
            if event.HasField("delta"):
                parts.append(event.delta.content)
    assert "".join(parts) == _first_attempt_text(tokenizer, prompt, generated)
