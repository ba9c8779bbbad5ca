"""Output text decoded here where vLLM's incremental detokenizer gets it wrong.

vLLM primes each request's detokenizer (``tokenizers``' ``DecodeStream``) with the
prompt ids. When the prompt ends inside a UTF-8 sequence (a token-id prompt cut
in the middle of a character), the first step of that stream returns the whole
prompt's text with the new token's: the prompt comes back as output. For such a
prompt each choice's text is decoded here instead, from the generated ids alone.
A continuation (``worker/continuation.py``) decodes here too, so its text goes
on exactly where the first attempt's stopped.
"""

from __future__ import annotations

from typing import Any, Final

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from worker.events import RequestStream

REPLACEMENT: Final = "\ufffd"
_TAIL: Final = 8
"""Prompt tokens decoded to see whether it ends inside a character (one is at most 4 bytes)."""


class Detokenizer:
    """Incremental text of one choice's tokens (vLLM's ``FastIncrementalDetokenizer`` algorithm)."""

    def __init__(
        self, backend: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self.backend = backend
        self.skip = skip_special_tokens
        self.stream = DecodeStream(ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def of(
        cls, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool
    ) -> Detokenizer | None:
        """One for ``tokenizer`` if it wraps a ``tokenizers.Tokenizer``, else None.

        It is primed with ``prompt_ids`` unless they end inside a character.
        """
        backend = getattr(tokenizer, "_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            return None
        primed = [] if ends_inside_character(backend, prompt_ids) else prompt_ids
        return cls(backend, primed, skip_special_tokens)

    def __call__(self, token_ids: list[int]) -> str:
        return "".join(self._step(token_id) or "" for token_id in token_ids)

    def _step(self, token_id: int) -> str | None:
        try:
            return self.stream.step(self.backend, token_id)
        except Exception:  # an invalid prefix breaks the stream's state: restart it (as vLLM)
            self.stream = DecodeStream(skip_special_tokens=self.skip)
            return self.stream.step(self.backend, token_id)


def ends_inside_character(backend: Tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt's last tokens leave a UTF-8 sequence unfinished."""
    return bool(prompt_ids) and backend.decode(prompt_ids[-_TAIL:]).endswith(REPLACEMENT)


def fix_prompt_echo(
    stream: RequestStream, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool
) -> None:
    """Decode each choice's text here if vLLM would echo the prompt (see the module doc)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer) or not ends_inside_character(backend, prompt_ids):
        return
    for choice in stream.choices:
        choice.detokenize = Detokenizer(backend, [], skip_special_tokens)
