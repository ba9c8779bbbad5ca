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

The pieces: ``worker/config_fix_keys.py`` (the coercion, pure),
``worker/config_fix_hooks.py`` (the wrappers and where they go) and
``worker/config_fix_probe.py`` (whether the bug reproduces); this module is the
plugin entry point and remembers what it did in this process.

Importing this module is cheap: transformers (and with it torch) is imported only inside
:func:`register`.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Literal

from worker import config_fix_hooks, config_fix_probe
from worker.config_fix_keys import IGNORE_KEYS_ATTR

logger = logging.getLogger(__name__)

FixStatus = Literal["applied", "not-needed", "unavailable", "ineffective", "not-registered"]
"""Outcome of :func:`register` in this process (see :func:`fix_status`)."""

_lock = threading.Lock()
_status: FixStatus | None = None


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
        needed = config_fix_probe.reproduces_bug()
    except ImportError as exc:
        logger.warning("Rope config fix unavailable: cannot import transformers (%s)", exc)
        return "unavailable"
    if not needed:
        return "applied" if config_fix_hooks.hooks_present() else "not-needed"
    installed = config_fix_hooks.install_hooks()
    if not installed and not config_fix_hooks.hooks_present():
        logger.warning(
            "Rope config fix unavailable: the list/set bug reproduces but no hook target "
            "(_check_received_keys, convert_rope_params_to_dict) was found (%s)",
            _versions(),
        )
        return "unavailable"
    if config_fix_probe.reproduces_bug():
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
