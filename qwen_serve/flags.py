"""Command-line flags derived from the settings models, so each setting is declared once.

Every field of a settings class becomes ``--field-name`` with the field's description
as its help, its type, and its choices where the type is a ``Literal``. Booleans take
``--x`` / ``--no-x``; list fields take a repeatable singular flag. Flags that are not
given stay unset, so the environment (``QS_*``) and the defaults still apply: flags win.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from pydantic_settings.exceptions import SettingsError

S = TypeVar("S", bound=BaseSettings)


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseSettings],
    *,
    skip: Iterable[str] = (),
    flag_names: Mapping[str, str] | None = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Add one flag per field of ``model`` (except ``skip``) to ``parser``.

    ``flag_names`` renames a flag (``{"image_url_hosts": "--image-url-host"}``) and
    ``aliases`` adds further spellings of it.
    """
    skipped = set(skip)
    names = dict(flag_names or {})
    extra = {key: list(value) for key, value in (aliases or {}).items()}
    group = parser.add_argument_group(f"{model.__name__} (also QS_* variables)")
    for name, info in model.model_fields.items():
        if name in skipped:
            continue
        flag = names.get(name, "--" + name.replace("_", "-"))
        help_text = (info.description or "").replace("%", "%%") or None
        group.add_argument(
            flag, *extra.get(name, ()), dest=name, help=help_text, **_kind(info.annotation)
        )


def settings_from_args(
    model: type[S], namespace: argparse.Namespace, parser: argparse.ArgumentParser, **extra: Any
) -> S:
    """``model`` from the flags that were given (others come from the environment).

    A value out of range, from a flag or a ``QS_*`` variable, ends the program through
    ``parser.error`` with the setting's name, not a traceback.
    """
    given = {k: v for k, v in vars(namespace).items() if v is not None and k in model.model_fields}
    try:
        return model(**given, **extra)
    except SettingsError as exc:  # a QS_* variable that does not parse (e.g. not JSON)
        parser.error(f"invalid settings (QS_* variables): {exc}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        parser.error(f"invalid settings (flags or QS_* variables): {problems}")


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field type: type, choices or action."""
    inner = _without_none(annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if origin is list:
        (item,) = typing.get_args(inner) or (str,)
        return {"action": "append", "type": item, "metavar": "VALUE"}
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        return {"choices": choices, "type": type(choices[0])}
    if inner in (int, float, str):
        return {"type": inner}
    return {"type": str}


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (and for ``Annotated[X, ...]``)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _without_none(members[0])
    return annotation
