"""Media placeholders must match the images sent, checked before vLLM renders anything.

vLLM expands one ``<|image_pad|>`` per image. It refuses an image without a
placeholder, but a placeholder without an image stays in the prompt as a plain
token, silently: a raw prompt with more placeholders than images, or chat text
that spells one out. The checks run before rendering on purpose: once vLLM's
multimodal processor has seen a request's images, its frontend cache records
them as sent to the engine, and refusing the request then would leave that
cache out of step with the engine's.

- Generate: the prompt (text, or token ids) holds exactly one ``<|image_pad|>``
  per image and no ``<|video_pad|>`` (the API takes no video).
- Chat: the chat template adds the placeholder of each image part, so no text
  of the request (message text, reasoning, tool calls, tools, template kwargs)
  may contain one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Final

from google.protobuf.message import Message

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import invalid

IMAGE: Final = "<|image_pad|>"
VIDEO: Final = "<|video_pad|>"
TOKENS: Final = (IMAGE, VIDEO)
"""Placeholder tokens looked up in the tokenizer's vocabulary."""


def token_ids(vocab: Mapping[str, int]) -> dict[str, int]:
    """The placeholder tokens the tokenizer has, with their ids."""
    return {token: vocab[token] for token in TOKENS if token in vocab}


def _strings(message: Message, prefix: str) -> Iterator[tuple[str, str]]:
    """(field path, value) of every set string field of ``message``, depth first."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        values = value if field.is_repeated else [value]
        for index, item in enumerate(values):
            where = f"{path}[{index}]" if field.is_repeated else path
            if isinstance(item, str):
                yield where, item
            elif isinstance(item, Message):
                yield from _strings(item, f"{where}.")


def check_chat(req: pb.ChatRequest) -> None:
    """No text of a chat may spell a placeholder; image parts bring their own."""
    for where, text in _strings(req, ""):
        for token in TOKENS:
            if token in text:
                raise invalid(
                    where,
                    f"contains {token}, a placeholder the server adds for each image part; "
                    "send images as image parts",
                )


def _count(prompt: str | Sequence[int], token: str, ids: Mapping[str, int]) -> int:
    if isinstance(prompt, str):
        return prompt.count(token)
    return list(prompt).count(ids[token]) if token in ids else 0


def check_generate(req: pb.GenerateRequest, ids: Mapping[str, int]) -> None:
    """A raw prompt holds one image placeholder per image and no video placeholder."""
    field = "text" if req.WhichOneof("prompt") == "text" else "token_ids"
    prompt: str | Sequence[int] = req.text if field == "text" else req.token_ids.ids
    if _count(prompt, VIDEO, ids):
        raise invalid(field, f"the prompt holds {VIDEO}: video is not supported")
    placeholders, images = _count(prompt, IMAGE, ids), len(req.images)
    if placeholders > images:
        raise invalid(
            field,
            f"the prompt holds {placeholders} {IMAGE} placeholders for {images} images: "
            "send exactly one image per placeholder",
        )
    if placeholders < images:
        raise invalid(
            "images",
            f"{images} images for {placeholders} {IMAGE} placeholders in the prompt: "
            "put one placeholder per image in the prompt",
        )
