"""Media placeholders of a raw prompt must match its images, checked before vLLM renders.

vLLM expands one ``<|image_pad|>`` per image. It refuses an image without a
placeholder, but a placeholder without an image stays in the prompt as a plain
token, silently: a raw prompt with more placeholders than images. The check runs
before rendering on purpose: once vLLM's multimodal processor has seen a request's
images, its frontend cache records them as sent to the engine, and refusing the
request then would leave that cache out of step with the engine's.

A GenerateRequest's prompt (text, or token ids, which need the tokenizer's ids of
the placeholders) holds exactly one ``<|image_pad|>`` per image and no
``<|video_pad|>`` (the API takes no video). A chat's text may spell no placeholder
at all (the chat template adds one per image part): the router checks that
(``router/validation.py``), as it needs no tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb


def token_ids(vocab: Mapping[str, int]) -> dict[str, int]:
    """The placeholder tokens the tokenizer has, with their ids."""
    return {token: vocab[token] for token in rules.PLACEHOLDERS if token in vocab}


def _count(prompt: str | Sequence[int], token: str, ids: Mapping[str, int]) -> int:
    if isinstance(prompt, str):
        return prompt.count(token)
    return list(prompt).count(ids[token]) if token in ids else 0


def check_generate(req: pb.GenerateRequest, ids: Mapping[str, int]) -> None:
    """A raw prompt holds one image placeholder per image and no video placeholder."""
    field = rules.prompt_field(req)
    prompt: str | Sequence[int] = req.text if field == rules.TEXT else req.token_ids.ids
    if _count(prompt, rules.VIDEO_PLACEHOLDER, ids):
        raise rules.video_in_prompt(field)
    placeholders, images = _count(prompt, rules.IMAGE_PLACEHOLDER, ids), len(req.images)
    if placeholders > images:
        raise rules.placeholders_without_images(field, placeholders, images)
    if placeholders < images:
        raise rules.images_without_placeholders(images, placeholders)
