"""Whether the installed transformers still has the RoPE list-vs-set bug.

:func:`reproduces_bug` builds a small config shaped like the failing Qwen3.5 text
config and runs the operations that raised; ``worker/config_fix.py`` hooks only
when it does, and runs it again to check the hooks worked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from worker.config_fix_keys import IGNORE_KEYS_ATTR

logger = logging.getLogger(__name__)

_LIST_SET_ERROR: Final = re.compile(
    r"unsupported operand type\(s\) for [^:]+: "
    r"(?:'(?:list|tuple)' and '(?:set|frozenset)'|'(?:set|frozenset)' and '(?:list|tuple)')"
)
_PROBE_ROPE: Final[Mapping[str, object]] = {
    "rope_type": "default",
    "rope_theta": 10_000.0,
    "mrope_section": [16, 24, 24],
    "mrope_interleaved": True,
}


def is_list_set_type_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is the list-vs-set ``TypeError``.

    huggingface_hub's strict dataclasses re-raise validator errors as
    ``StrictDataclassClassValidationError``, so the chain and the message are both checked.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _LIST_SET_ERROR.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _probe_steps() -> list[tuple[str, Callable[[Any], object]]]:
    """Operations run on the probe config after construction, in order."""
    return [
        ("validate_rope", lambda config: config.validate_rope()),
        (
            "convert_rope_params_to_dict",
            lambda config: config.convert_rope_params_to_dict(partial_rotary_factor=0.5),
        ),
    ]


def reproduces_bug() -> bool:
    """Whether the installed transformers raises the list-vs-set ``TypeError``.

    Builds a small ``LlamaConfig`` shaped like the failing Qwen3.5 text config: a list of
    ignore keys passed as a keyword (what vLLM's Qwen3.5 configs and ``config.json`` do),
    ``partial_rotary_factor`` set, M-RoPE keys in ``rope_parameters``; then validates it
    again and reconverts it, as vLLM's ``patch_rope_parameters`` and reloads do. Other
    errors from these steps (APIs missing in a given version) do not count.
    """
    from transformers import LlamaConfig

    try:
        config = LlamaConfig(
            partial_rotary_factor=0.5,
            rope_parameters=dict(_PROBE_ROPE),
            **{IGNORE_KEYS_ATTR: ["mrope_section", "mrope_interleaved"]},
        )
    except Exception as exc:
        return _probe_failed("construction", exc)
    for step, run in _probe_steps():
        if getattr(config, step, None) is None:
            continue
        try:
            run(config)
        except Exception as exc:
            if _probe_failed(step, exc):
                return True
    return False


def _probe_failed(step: str, exc: Exception) -> bool:
    """Classify a probe exception: True for the bug, False (logged) for anything else."""
    if is_list_set_type_error(exc):
        logger.debug("Probe step %s reproduced the rope list/set bug: %s", step, exc)
        return True
    logger.debug("Probe step %s failed for another reason: %r", step, exc)
    return False
