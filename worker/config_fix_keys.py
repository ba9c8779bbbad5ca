"""Coercing ``ignore_keys_at_rope_validation`` to a set, in a config and its sub-configs.

Pure functions of the model card's config fix (``worker/config_fix.py``): they work on
``config.json`` dicts (a fixed copy is returned) and on config objects (fixed in place),
and import nothing heavy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, TypeVar, cast

logger = logging.getLogger(__name__)

IGNORE_KEYS_ATTR: Final = "ignore_keys_at_rope_validation"
SUB_CONFIG_KEYS: Final = ("text_config", "vision_config", "audio_config")

_MAX_DEPTH: Final = 4

_C = TypeVar("_C")


def as_key_set(value: object) -> object:
    """Return ``set(value)`` for a list or tuple of keys, ``value`` unchanged otherwise.

    Sets, frozensets and ``None`` already work with the set operators; anything that cannot
    be turned into a set (unhashable items) is returned as is.
    """
    if not isinstance(value, list | tuple):
        return value
    try:
        return set(value)
    except TypeError:
        return value


def normalize_rope_ignore_keys(config: _C) -> _C:
    """Coerce ``ignore_keys_at_rope_validation`` to a set, recursing into sub-configs.

    * A mapping (a ``config.json`` dict) is not modified: a new ``dict`` is returned, with
      the key fixed at every level (``text_config``, ``vision_config``, ...).
    * A config object is fixed in place and returned: the attribute is set on the instance
      when the value it resolves to is a list or tuple, then sub-configs (the names above
      plus the class's ``sub_configs``) are visited.

    Idempotent; values that are already sets are left untouched.
    """
    if isinstance(config, Mapping):
        return cast(_C, _normalize_mapping(config, depth=0))
    _normalize_object(config, depth=0)
    return config


def _is_sub_config_key(key: object) -> bool:
    """Whether a config key names a nested config (``text_config``, ``llm_config``...)."""
    return isinstance(key, str) and (key in SUB_CONFIG_KEYS or key.endswith("_config"))


def _normalize_mapping(config: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    """Return a copy of ``config`` with the ignore keys coerced at every level."""
    fixed = dict(config)
    if IGNORE_KEYS_ATTR in fixed:
        fixed[IGNORE_KEYS_ATTR] = as_key_set(fixed[IGNORE_KEYS_ATTR])
    if depth >= _MAX_DEPTH:
        return fixed
    for key, value in fixed.items():
        if _is_sub_config_key(key) and isinstance(value, Mapping):
            fixed[key] = _normalize_mapping(value, depth + 1)
    return fixed


def normalize_own_attr(config: object) -> None:
    """Set the coerced value on ``config`` itself if it resolves to a list or tuple."""
    value = getattr(config, IGNORE_KEYS_ATTR, None)
    coerced = as_key_set(value)
    if coerced is value:
        return
    try:
        setattr(config, IGNORE_KEYS_ATTR, coerced)
    except (AttributeError, TypeError):
        logger.debug("Cannot set %s on %s", IGNORE_KEYS_ATTR, type(config).__name__)


def _sub_config_names(config: object) -> list[str]:
    """Names of the attributes of ``config`` that may hold nested configs."""
    names = list(SUB_CONFIG_KEYS)
    declared = getattr(config, "sub_configs", None)
    if isinstance(declared, Mapping):
        names.extend(name for name in declared if isinstance(name, str) and name not in names)
    return names


def _normalize_object(config: object, depth: int) -> None:
    """Fix ``config`` and its sub-configs in place."""
    normalize_own_attr(config)
    if depth >= _MAX_DEPTH:
        return
    for name in _sub_config_names(config):
        sub = getattr(config, name, None)
        if sub is None or isinstance(sub, str | int | float | bool):
            continue
        if isinstance(sub, Mapping):
            fixed = _normalize_mapping(sub, depth + 1)
            if fixed != sub:
                _set_quietly(config, name, fixed)
        else:
            _normalize_object(sub, depth + 1)


def _set_quietly(target: object, name: str, value: object) -> None:
    """``setattr`` that logs instead of raising (frozen or slotted objects)."""
    try:
        setattr(target, name, value)
    except (AttributeError, TypeError):
        logger.debug("Cannot set %s on %s", name, type(target).__name__)
