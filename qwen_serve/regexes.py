"""Regexes that match no string at all (pure; router validation uses it).

vLLM's grammar backend cannot produce output for such a constraint: it fails
the request when the first token is sampled, fails it mid-stream when the empty
part comes after some output (``(ab)+c[^\\s\\S]``), or, when the empty part
sits behind a loop (``x{30}y*[^\\s\\S]``), streams the loop until ``max_tokens``
and returns text the regex does not match. :func:`unsatisfiable` finds them
from Python's own parse of the pattern: a character class that admits no
character (``[^\\s\\S]``, ``[^\\x00-\\U0010ffff]``), in a part every match must
go through. It answers only when no string can match (``None``: possibly
satisfiable); the engine still catches what Python's dialect cannot see.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Final

MAX_CODE_POINT: Final = 0x10FFFF
_COMPLEMENTS: Final = (
    frozenset({"CATEGORY_SPACE", "CATEGORY_NOT_SPACE"}),
    frozenset({"CATEGORY_DIGIT", "CATEGORY_NOT_DIGIT"}),
    frozenset({"CATEGORY_WORD", "CATEGORY_NOT_WORD"}),
)
_REPEATS: Final = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})


def unsatisfiable(pattern: str) -> str | None:
    """Why no string matches ``pattern`` (a valid Python regex), or None when one may."""
    try:
        parsed = importlib.import_module("re._parser").parse(pattern)
        empty = _sequence_is_empty(parsed)
    except Exception:  # another Python's parser internals, or a pattern re refuses
        return None
    return "a character class in it matches no character (e.g. [^\\s\\S])" if empty else None


def _sequence_is_empty(items: Iterable[tuple[Any, Any]]) -> bool:
    """A concatenation matches nothing if any of its parts matches nothing."""
    return any(_item_is_empty(str(op), arg) for op, arg in items)


def _item_is_empty(op: str, arg: Any) -> bool:
    if op == "IN":
        return _class_is_empty(arg)
    if op == "BRANCH":
        return all(_sequence_is_empty(alternative) for alternative in arg[1])
    if op == "SUBPATTERN":
        return _sequence_is_empty(arg[-1])
    if op == "ATOMIC_GROUP":
        return _sequence_is_empty(arg)
    if op in _REPEATS:
        least, _, body = arg
        return bool(least > 0 and _sequence_is_empty(body))
    return False  # literals, ANY, anchors, lookarounds, back references


def _class_is_empty(items: list[tuple[Any, Any]]) -> bool:
    """Whether ``[...]`` admits no character: a negated class that covers every one."""
    if not items or str(items[0][0]) != "NEGATE":
        return not items
    categories = {str(arg) for op, arg in items[1:] if str(op) == "CATEGORY"}
    if any(pair <= categories for pair in _COMPLEMENTS):
        return True
    spans = sorted(
        (arg, arg) if str(op) == "LITERAL" else arg
        for op, arg in items[1:]
        if str(op) in ("LITERAL", "RANGE")
    )
    reached = -1
    for low, high in spans:
        if low > reached + 1:
            return False
        reached = max(reached, high)
    return reached >= MAX_CODE_POINT
