"""Tool declarations: from a JSON Schema, a Python function's signature or a JSON file.

::

    def get_weather(city: str, days: int = 1) -> str:
        '''Weather forecast for a city.

        Args:
            city: City name, e.g. "Paris".
            days: Days ahead, 1-7.
        '''

    tools = [tool_from_function(get_weather)]
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb

TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def tool(name: str, description: str, parameters: Mapping[str, Any] | str) -> pb.Tool:
    """A tool from its name, description and JSON Schema (a dict or JSON text)."""
    if not TOOL_NAME_RE.fullmatch(name):
        raise ValueError(f"tool name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    schema = json.loads(parameters) if isinstance(parameters, str) else dict(parameters)
    if not isinstance(schema, dict):
        raise ValueError(f"tool {name!r}: the parameters schema must be a JSON object")
    return pb.Tool(name=name, description=description, parameters_json_schema=json.dumps(schema))


def tools_from_json(data: Any) -> list[pb.Tool]:
    """Tools from parsed JSON: a list of ``{"name", "description", "parameters"}`` objects,
    or of OpenAI-style ``{"type": "function", "function": {...}}`` objects."""
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        spec = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"tools[{i}]: expected an object with a name")
        parameters = spec.get("parameters", spec.get("parameters_json_schema")) or {}
        out.append(tool(spec["name"], spec.get("description", ""), parameters))
    return out


def tools_from_file(path: str | Path) -> list[pb.Tool]:
    """Tools from a JSON file (see :func:`tools_from_json`)."""
    return tools_from_json(json.loads(Path(path).read_text()))


def tool_choice(choice: str) -> pb.ToolChoice:
    """``"auto"``, ``"none"``, ``"required"`` or a tool name (that tool must be called)."""
    modes = {
        "auto": pb.ToolChoice.MODE_AUTO,
        "none": pb.ToolChoice.MODE_NONE,
        "required": pb.ToolChoice.MODE_REQUIRED,
    }
    if choice in modes:
        return pb.ToolChoice(mode=modes[choice])
    return pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function_name=choice)


def tool_from_function(
    fn: Callable[..., Any], name: str | None = None, description: str | None = None
) -> pb.Tool:
    """A tool from a function: its name, its docstring and a schema of its parameters.

    Types map to JSON Schema (``str``, ``int``, ``float``, ``bool``, ``list[T]``,
    ``dict``, ``Literal[...]``, ``Enum``, ``T | None``); a parameter without a
    default is required. ``Args:`` lines of a Google-style docstring, or
    ``Annotated[T, "text"]``, describe the parameters.
    """
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn, include_extras=True)
    properties: dict[str, Any] = {}
    required = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name == "self":
            continue
        schema = type_schema(hints.get(param.name, str))
        if param.name in arg_docs and "description" not in schema:
            schema["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        else:
            default = param.default.value if isinstance(param.default, enum.Enum) else param.default
            if default is not None and _json_value(default):
                schema["default"] = default
        properties[param.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return tool(name or fn.__name__, description or summary, parameters)


def type_schema(hint: Any) -> dict[str, Any]:
    """JSON Schema of a Python type hint (unknown types become ``{}``: any value)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        schema = type_schema(args[0])
        texts = [a for a in args[1:] if isinstance(a, str)]
        return {**schema, "description": texts[0]} if texts else schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return type_schema(members[0])
        return {"anyOf": [type_schema(a) for a in members]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset, Sequence):
        items = args[0] if args and args[0] is not Ellipsis else None
        return {"type": "array", **({"items": type_schema(items)} if items else {})}
    if hint is dict or origin in (dict, Mapping):
        return {"type": "object"}
    return {}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) of a Google-style docstring."""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    args: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if section:
        current = ""
        for line in section.group(1).splitlines():
            match = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
            if match and len(line) - len(line.lstrip()) <= 4:
                current = match.group(1)
                args[current] = match.group(2).strip()
            elif current and line.strip():
                args[current] = f"{args[current]} {line.strip()}"
    return summary, args


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
