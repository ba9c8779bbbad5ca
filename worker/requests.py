"""The prompt and priority ``AsyncLLM.generate`` takes for a request, besides chat rendering.

A GenerateRequest's raw prompt becomes a vLLM ``TextPrompt`` or ``TokensPrompt``
(token ids checked against the engine's vocabulary: the one prompt rule the
router cannot check), with its decoded images; the API priority becomes vLLM's.
Chat input is ``worker.chat_input``, sampling ``worker.sampling`` and
structured outputs ``worker.constraints``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from PIL.Image import Image as PILImage

from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb

PRIORITIES: Final[Mapping[int, int]] = {
    pb.PRIORITY_HIGH: -1,
    pb.PRIORITY_NORMAL: 0,
    pb.PRIORITY_UNSPECIFIED: 0,
    pb.PRIORITY_LOW: 1,
}
"""API priority -> vLLM priority. vLLM serves lower values first; ties go by arrival."""


def priority(p: int) -> int:
    """vLLM priority for an API priority: HIGH -1, NORMAL/unset 0, LOW 1 (lower runs first)."""
    return PRIORITIES.get(p, 0)


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    """The ids as a list, each checked to be below ``vocab_size``."""
    for i, token in enumerate(ids):
        if token >= vocab_size:
            raise rules.token_id_outside_vocab(f"{field}[{i}]", token, vocab_size)
    return list(ids)


def generate_prompt(
    req: pb.GenerateRequest, vocab_size: int, images: Sequence[PILImage] = ()
) -> dict[str, Any]:
    """A vLLM TextPrompt or TokensPrompt dict, with the decoded ``images`` as multi_modal_data."""
    prompt: dict[str, Any]
    if rules.check_prompt(req) == rules.TEXT:
        prompt = {"prompt": req.text}
    else:
        ids = check_token_ids(req.token_ids.ids, vocab_size, rules.TOKEN_ID_LIST)
        prompt = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt
