"""JSON text from requests, parsed with a nesting limit (router and worker).

Every JSON-bearing request field (tool parameter schemas, a tool call's
arguments, ``chat_template_kwargs_json``, ``structured_output.json_schema``)
goes through :func:`load`: text that is not JSON, or that nests deeper than
:data:`MAX_DEPTH` levels, is INVALID_ARGUMENT naming the field. The limit keeps
the recursive code downstream (``json``, ``jsonschema``, vLLM, xgrammar, the
chat template) far from Python's recursion limit; ``json.loads`` itself raises
``RecursionError`` near 1,000 levels, which is caught here too.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from qwen_serve.errors import RequestError, invalid

MAX_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted in a JSON field."""


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` and ``{}`` are 1).

    Iterative, so it is safe on any value ``json.loads`` returned.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _too_deep(field: str) -> RequestError:
    return invalid(field, f"JSON nested too deeply: at most {MAX_DEPTH} levels")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load(text: str, field: str) -> Any:
    """The JSON value of ``text``; INVALID_ARGUMENT naming ``field`` if not JSON or too deep.

    Standard JSON only: no ``NaN`` or ``Infinity``, and no number that overflows a double.
    """
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep(field) from None
    except ValueError as exc:
        raise invalid(field, f"not valid JSON: {exc}") from None
    if depth(value) > MAX_DEPTH:
        raise _too_deep(field)
    return value


def load_object(text: str, field: str) -> dict[str, Any]:
    """A JSON object of ``text`` (see :func:`load`); anything else is INVALID_ARGUMENT."""
    value = load(text, field)
    if not isinstance(value, dict):
        raise invalid(field, "must be a JSON object")
    return value
