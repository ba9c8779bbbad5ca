"""The hooks of the model card's config fix: wrappers that coerce the ignore keys first.

Each wrapper replaces one transformers function that combines the RoPE ignore keys
with set operators (see ``worker/config_fix.py``) and turns a list or tuple of keys
into a set before calling it. Wrappers carry a marker, so nothing is wrapped twice.
transformers is imported only when the hook targets are looked up.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from worker.config_fix_keys import IGNORE_KEYS_ATTR, as_key_set, normalize_own_attr

_MARKER: Final = "__qwen_serve_rope_fix__"

HookTarget = tuple[type | ModuleType, str, str, bool]
"""``(owner, attribute, parameter, fix_self)``: where a hook belongs."""


def is_patched(func: object) -> bool:
    """Whether ``func`` (or the function inside a staticmethod) is one of our wrappers."""
    inner = func.__func__ if isinstance(func, staticmethod) else func
    return bool(getattr(inner, _MARKER, False))


def _param_index(func: Callable[..., Any], name: str) -> int | None:
    """Position of parameter ``name`` in ``func``'s signature, if it can be passed so."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    for index, param in enumerate(params):
        if param.name == name and param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return index
    return None


def _coercing_wrapper(
    func: Callable[..., Any], param: str, *, fix_self: bool
) -> Callable[..., Any]:
    """Wrap ``func`` so argument ``param`` (and ``self``'s attribute) become sets first."""
    index = _param_index(func, param)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if param in kwargs:
            kwargs[param] = as_key_set(kwargs[param])
        elif index is not None and index < len(args):
            args = (*args[:index], as_key_set(args[index]), *args[index + 1 :])
        if fix_self and args:
            normalize_own_attr(args[0])
        return func(*args, **kwargs)

    setattr(wrapper, _MARKER, True)
    return wrapper


def _wrap_attribute(owner: type | ModuleType, name: str, param: str, *, fix_self: bool) -> bool:
    """Replace ``owner.name`` (function or staticmethod) by a coercing wrapper.

    Returns True when a wrapper was installed now, False when the attribute is missing, not
    a function, or already wrapped.
    """
    raw = vars(owner).get(name)
    is_static = isinstance(raw, staticmethod)
    func = raw.__func__ if isinstance(raw, staticmethod) else raw
    if not inspect.isfunction(func) or is_patched(func):
        return False
    wrapper = _coercing_wrapper(func, param, fix_self=fix_self)
    setattr(owner, name, staticmethod(wrapper) if is_static else wrapper)
    return True


def _defining_class(cls: type, name: str) -> type | None:
    """The class in ``cls.__mro__`` whose body defines ``name``."""
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def _base_config_class() -> type | None:
    """transformers' ``PreTrainedConfig`` (``PretrainedConfig`` before v5)."""
    from transformers import configuration_utils

    base = getattr(configuration_utils, "PreTrainedConfig", None) or getattr(
        configuration_utils, "PretrainedConfig", None
    )
    return base if isinstance(base, type) else None


def hook_targets() -> list[HookTarget]:
    """``(owner, attribute, parameter, fix_self)`` for every place a hook belongs.

    * ``_check_received_keys(..., ignore_keys)``: the set difference. A staticmethod of
      ``RotaryEmbeddingConfigMixin`` in v5, a module function in older layouts.
    * ``convert_rope_params_to_dict(self, ...)``: the set union. It took the keys as a
      keyword argument in early v5 and reads ``self.ignore_keys_at_rope_validation`` later.
    """
    import transformers.modeling_rope_utils as rope_utils

    targets: list[HookTarget] = []
    base = _base_config_class()
    if base is not None:
        owner = _defining_class(base, "_check_received_keys")
        if owner is not None:
            targets.append((owner, "_check_received_keys", "ignore_keys", False))
        owner = _defining_class(base, "convert_rope_params_to_dict")
        if owner is not None:
            targets.append((owner, "convert_rope_params_to_dict", IGNORE_KEYS_ATTR, True))
    if inspect.isfunction(vars(rope_utils).get("_check_received_keys")):
        targets.append((rope_utils, "_check_received_keys", "ignore_keys", False))
    return targets


def _target_name(owner: type | ModuleType, name: str) -> str:
    """Readable ``module.Class.attr`` for logs."""
    return f"{getattr(owner, '__module__', '')}.{getattr(owner, '__name__', '?')}.{name}".lstrip(
        "."
    )


def install_hooks() -> list[str]:
    """Wrap every hook target not wrapped yet; return the names wrapped by this call.

    Idempotent: a second call wraps nothing (the wrappers carry a marker attribute).
    Imports transformers. ``config_fix.register`` calls this only when the bug reproduces.
    """
    installed = []
    for owner, name, param, fix_self in hook_targets():
        if _wrap_attribute(owner, name, param, fix_self=fix_self):
            installed.append(_target_name(owner, name))
    return installed


def hooks_present() -> bool:
    """Whether any hook target is currently one of our wrappers."""
    return any(is_patched(vars(owner).get(name)) for owner, name, _, _ in hook_targets())
