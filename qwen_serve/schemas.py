"""Which JSON Schemas admit no value at all (pure; router validation uses it).

A constraint that no output can satisfy cannot be generated: vLLM's grammar
backend either ignores the keyword that makes it so (``{"not": {}}`` then
yields JSON that breaks the schema) or rejects every token the model samples
(``{"$ref": "#"}``). :func:`unsatisfiable` finds the common cases before the
request is queued. It is conservative: it answers only when no value can match,
and ``None`` means "possibly satisfiable". Local ``$ref`` pointers are followed;
a schema that can only be met through itself on the same value or through an
endless chain of required children has no finite instance, so it is empty.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from qwen_serve import regexes

ANNOTATIONS: Final = frozenset(
    {"title", "description", "$comment", "examples", "default", "deprecated", "$schema", "$id"}
    | {"readOnly", "writeOnly", "$defs", "definitions", "$anchor"}
)
"""Keywords that do not restrict values: a schema of only these accepts anything."""
BUDGET: Final = 20_000
"""Schema nodes visited before giving up (a pathological schema is left to the engine)."""
_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "string": (str,),
    "integer": (int, float),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "object": (dict,),
    "array": (list,),
}


class _GiveUp(Exception):
    """The schema is too large or refers outside itself: no verdict."""


def unsatisfiable(schema: Any) -> str | None:
    """Why no JSON value matches ``schema``, or None when one may."""
    try:
        return _Checker(schema).why(schema, frozenset())
    except _GiveUp:
        return None


def _accepts_anything(schema: Any) -> bool:
    return schema is True or (isinstance(schema, dict) and set(schema) <= ANNOTATIONS)


def _has_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name != "boolean":
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, (object,)))


def _only_type(schema: Mapping[str, Any], name: str) -> bool:
    """Whether ``type`` limits values to ``name`` alone."""
    types = schema.get("type")
    return types == name or types == [name]


def _typed_values(schema: dict[str, Any]) -> str | None:
    """Why ``enum`` or ``const`` leave no value of the types ``type`` allows."""
    types = schema.get("type")
    names = [types] if isinstance(types, str) else types if isinstance(types, list) else None
    enum = schema.get("enum")
    if isinstance(enum, list) and not [
        v for v in enum if names is None or any(_has_type(v, n) for n in names)
    ]:
        return '"enum" lists no value of the allowed type'
    const_ok = "const" not in schema or names is None
    if not const_ok and not any(_has_type(schema["const"], n) for n in names or ()):
        return '"const" is not of the allowed type'
    return None


class _Checker:
    """One emptiness analysis; ``visiting`` holds the ``$ref`` targets on the current path."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.visits = 0

    def why(self, schema: Any, visiting: frozenset[str]) -> str | None:
        self.visits += 1
        if self.visits > BUDGET:
            raise _GiveUp
        if schema is False:
            return "the schema is false"
        if not isinstance(schema, dict):
            return None
        if "$ref" in schema:  # siblings are ignored before draft 2019: follow only the ref
            return self._ref(schema["$ref"], visiting)
        return self._keywords(schema, visiting) or self._applicators(schema, visiting)

    def _keywords(self, schema: dict[str, Any], visiting: frozenset[str]) -> str | None:
        if "not" in schema and _accepts_anything(schema["not"]):
            return '"not" excludes every value'
        pattern = schema.get("pattern")
        if _only_type(schema, "string") and isinstance(pattern, str):
            reason = regexes.unsatisfiable(pattern)
            if reason:
                return f'"pattern": {reason}'
        return _typed_values(schema) or self._children(schema, visiting)

    def _children(self, schema: dict[str, Any], visiting: frozenset[str]) -> str | None:
        """A child every value of an object or array type must have, and none can."""
        if _only_type(schema, "object"):
            properties = schema.get("properties")
            for name in schema.get("required") or ():
                if isinstance(properties, dict) and isinstance(name, str) and name in properties:
                    reason = self.why(properties[name], visiting)
                    if reason:
                        return f'required property "{name}": {reason}'
        items, least = schema.get("items"), schema.get("minItems")
        if (
            _only_type(schema, "array")
            and isinstance(least, int)
            and least > 0
            and "prefixItems" not in schema
            and isinstance(items, dict | bool)
        ):
            reason = self.why(items, visiting)
            if reason:
                return f"at least one item is required, and items: {reason}"
        return None

    def _applicators(self, schema: dict[str, Any], visiting: frozenset[str]) -> str | None:
        for member in schema.get("allOf") or ():
            reason = self.why(member, visiting)
            if reason:
                return f'"allOf": {reason}'
        for keyword in ("anyOf", "oneOf"):
            members = schema.get(keyword)
            if isinstance(members, list) and members:
                reasons = [self.why(member, visiting) for member in members]
                if all(reasons):
                    return f'no "{keyword}" alternative can match ({reasons[0]})'
        return None

    def _ref(self, ref: Any, visiting: frozenset[str]) -> str | None:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _GiveUp  # a remote or anchor reference: not resolved here
        if ref in visiting:
            return f'"$ref": "{ref}" can only be met through itself'
        return self.why(self._resolve(ref), visiting | {ref})

    def _resolve(self, ref: str) -> Any:
        node = self.root
        pointer = urllib.parse.unquote(ref[1:])
        if pointer and not pointer.startswith("/"):
            raise _GiveUp  # a named anchor
        for token in pointer.split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _GiveUp  # a dangling pointer: vLLM reports it
        return node
