"""Run-time fix for the Qwen3.5 rope-validation "list where a set is needed" bug.

Background (see the Qwen3.5-35B-A3B-GPTQ-8bit model card): transformers v5 keeps the
keys that RoPE validation must skip in ``ignore_keys_at_rope_validation`` and combines
them with set operators. Older releases did so without coercion:

* ``convert_rope_params_to_dict``: ``ignore_keys | {"partial_rotary_factor"}``
  -> ``TypeError: unsupported operand type(s) for |: 'list' and 'set'``
* ``_check_received_keys``: ``received_keys -= ignore_keys``
  -> ``TypeError: unsupported operand type(s) for -=: 'set' and 'list'``

A list reaches them when a config class passes one (vLLM's own ``Qwen3_5TextConfig`` and
``Qwen3_5MoeTextConfig`` did, ``kwargs["ignore_keys_at_rope_validation"] = [...]``), or when
a ``config.json`` carries the key (JSON has no sets). transformers coerces with ``set()`` at
both sites in current releases (5.19 is fixed), as does vLLM 0.32, but older ROCm images
still ship the broken pair.

This module is a vLLM general plugin (entry point group ``vllm.general_plugins``). vLLM
calls :func:`register` in every process it starts (API process, engine core, workers), so
the fix is applied wherever configs are built. :func:`register` first probes whether the
installed transformers still raises; only then does it wrap the two functions above so the
value is coerced to a set before they run. Nothing in site-packages is edited.

Importing this module is cheap: transformers (and with it torch) is imported only inside
:func:`register`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Final, Literal, TypeVar, cast

logger = logging.getLogger(__name__)

FixStatus = Literal["applied", "not-needed", "unavailable", "ineffective", "not-registered"]
"""Outcome of :func:`register` in this process (see :func:`fix_status`)."""

IGNORE_KEYS_ATTR: Final = "ignore_keys_at_rope_validation"
SUB_CONFIG_KEYS: Final = ("text_config", "vision_config", "audio_config")

_MARKER: Final = "__qwen_serve_rope_fix__"
_MAX_DEPTH: Final = 4
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

_C = TypeVar("_C")

_lock = threading.Lock()
_status: FixStatus | None = None


# --------------------------------------------------------------------------------------
# Pure normalisation
# --------------------------------------------------------------------------------------


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


def _normalize_own_attr(config: object) -> None:
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
    _normalize_own_attr(config)
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


# --------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------


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
            _normalize_own_attr(args[0])
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


def _hook_targets() -> list[tuple[type | ModuleType, str, str, bool]]:
    """``(owner, attribute, parameter, fix_self)`` for every place a hook belongs.

    * ``_check_received_keys(..., ignore_keys)``: the set difference. A staticmethod of
      ``RotaryEmbeddingConfigMixin`` in v5, a module function in older layouts.
    * ``convert_rope_params_to_dict(self, ...)``: the set union. It took the keys as a
      keyword argument in early v5 and reads ``self.ignore_keys_at_rope_validation`` later.
    """
    import transformers.modeling_rope_utils as rope_utils

    targets: list[tuple[type | ModuleType, str, str, bool]] = []
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
    Imports transformers. :func:`register` calls this only when the bug reproduces.
    """
    installed = []
    for owner, name, param, fix_self in _hook_targets():
        if _wrap_attribute(owner, name, param, fix_self=fix_self):
            installed.append(_target_name(owner, name))
    return installed


def hooks_present() -> bool:
    """Whether any hook target is currently one of our wrappers."""
    return any(is_patched(vars(owner).get(name)) for owner, name, _, _ in _hook_targets())


# --------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Plugin entry point
# --------------------------------------------------------------------------------------


def _versions() -> str:
    """``transformers=X vllm=Y`` for log lines (only modules already imported are asked)."""
    parts = []
    for name in ("transformers", "vllm"):
        module = sys.modules.get(name)
        parts.append(f"{name}={getattr(module, '__version__', 'not-imported')}")
    return " ".join(parts)


def _apply() -> FixStatus:
    """Probe, hook if needed, verify. Logs a warning for every outcome but success."""
    try:
        needed = reproduces_bug()
    except ImportError as exc:
        logger.warning("Rope config fix unavailable: cannot import transformers (%s)", exc)
        return "unavailable"
    if not needed:
        return "applied" if hooks_present() else "not-needed"
    installed = install_hooks()
    if not installed and not hooks_present():
        logger.warning(
            "Rope config fix unavailable: the list/set bug reproduces but no hook target "
            "(_check_received_keys, convert_rope_params_to_dict) was found (%s)",
            _versions(),
        )
        return "unavailable"
    if reproduces_bug():
        logger.warning(
            "Rope config fix ineffective: wrapped %s but the list/set TypeError persists (%s)",
            installed,
            _versions(),
        )
        return "ineffective"
    logger.debug("Rope config fix wrapped %s", installed)
    return "applied"


def _log_outcome(status: FixStatus) -> None:
    """The one INFO line per process."""
    if status == "applied":
        logger.info(
            "Rope config fix applied: %s is coerced to a set before RoPE validation (%s)",
            IGNORE_KEYS_ATTR,
            _versions(),
        )
    elif status == "not-needed":
        logger.info(
            "Rope config fix not needed: installed transformers accepts a list %s (%s)",
            IGNORE_KEYS_ATTR,
            _versions(),
        )


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``); never raises.

    Runs once per process (later calls return at once); the wrapped functions also carry a
    marker, so even a reloaded module never wraps them twice.
    """
    global _status
    with _lock:
        if _status is not None:
            return
        try:
            status = _apply()
        except Exception:  # a plugin error would abort vLLM's start-up
            logger.warning("Rope config fix unavailable: unexpected error", exc_info=True)
            status = "unavailable"
        _status = status
    _log_outcome(status)


def fix_status() -> FixStatus:
    """What :func:`register` did in this process.

    ``"applied"`` (hooks in place), ``"not-needed"`` (installed versions already fixed),
    ``"unavailable"`` (transformers or the hook targets missing), ``"ineffective"`` (hooked
    but the probe still fails) or ``"not-registered"`` (register has not run here yet;
    vLLM runs it when it creates an engine).
    """
    return _status or "not-registered"
