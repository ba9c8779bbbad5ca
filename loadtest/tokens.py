"""How many tokens a streamed response message carries.

ghz measures whole calls only. For token streams we also need time to first
token and the gaps between tokens, so each response message is counted:

- ``qwen_serve.api.v1.ChatEvent``: a Delta carries ``len(token_ids)`` tokens (one
  when only text is set, the worker coalesces several); an Error event ends the
  stream with that code.
- ``vllm.grpc.engine.GenerateResponse`` (vLLM's gRPC server): a chunk carries
  ``len(token_ids)`` tokens.
- Any other message counts as one token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

CHAT_EVENT = "qwen_serve.api.v1.ChatEvent"
VLLM_GENERATE_RESPONSE = "vllm.grpc.engine.GenerateResponse"


@dataclass(frozen=True)
class Counted:
    """What one response message means for the token metrics."""

    tokens: int = 0
    stamps_ns: tuple[int, ...] = ()
    """Emit times written into the text by bench.sim_worker (``--stamped-tokens``)."""
    error_code: int = 0
    error_message: str = ""


Counter = Callable[[Message], Counted]


def _chat_event(stamped: bool) -> Counter:
    def count(event: Message) -> Counted:
        kind = event.WhichOneof("event")
        if kind == "delta":
            delta = event.delta  # type: ignore[attr-defined]
            tokens = len(delta.token_ids) or int(bool(delta.content or delta.reasoning))
            stamps: tuple[int, ...] = ()
            if stamped:
                stamps = tuple(int(s) for s in delta.content.split() if s.isdigit())
                tokens = max(tokens, len(stamps))
            return Counted(tokens=tokens, stamps_ns=stamps)
        if kind == "error":
            error = event.error  # type: ignore[attr-defined]
            return Counted(error_code=error.code or 2, error_message=error.message)
        return Counted()

    return count


def _vllm_generate(response: Message) -> Counted:
    if response.WhichOneof("response") == "chunk":
        return Counted(tokens=len(response.chunk.token_ids))  # type: ignore[attr-defined]
    return Counted()


def _one_each(_message: Message) -> Counted:
    return Counted(tokens=1)


def counter_for(full_name: str, stamped: bool = False) -> Counter:
    """The counter for responses of the message type ``full_name``."""
    if full_name == CHAT_EVENT:
        return _chat_event(stamped)
    if full_name == VLLM_GENERATE_RESPONSE:
        return _vllm_generate
    return _one_each
