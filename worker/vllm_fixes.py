"""Fixes for known vLLM bugs, applied in every vLLM process (a ``vllm.general_plugins`` entry).

- vLLM 0.23's CPU MoE without its grouped-GEMM kernel (``prepack_moe_weight``, absent from
  the AVX2 build of ``vllm._C``) falls back to ``cpu_fused_moe_torch``, whose SiLU
  activation builds a ``SiluAndMul`` CustomOp at forward time. A CustomOp reads the
  current vLLM config in its constructor, which is not set during the forward pass, so
  the engine dies in its first profile run ("Current vLLM config is not set"). The
  fallback's activation is replaced by the same computation without a CustomOp. Later
  versions no longer build it there; the fix does nothing where the table is absent or
  the grouped-GEMM kernel exists.

Each fix checks for the exact code it replaces, logs once when applied, and never raises
(a plugin error would stop vLLM from starting).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_applied: list[str] = []


def silu_and_mul(x: Any) -> Any:
    """SiLU of the first half of the last dimension times its second half."""
    import torch.nn.functional as F

    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def fix_cpu_moe_activation() -> bool:
    """vLLM 0.23, CPU without the grouped-GEMM kernel: a SiLU that builds no CustomOp."""
    try:
        import torch
        from vllm.model_executor.layers.fused_moe import cpu_fused_moe
        from vllm.platforms import current_platform
    except ImportError:
        return False
    table = getattr(cpu_fused_moe, "_CPU_MOE_ACT_FN", None)
    activation = getattr(getattr(cpu_fused_moe, "MoEActivation", None), "SILU", None)
    if not current_platform.is_cpu() or table is None or activation not in table:
        return False
    if hasattr(torch.ops._C, "prepack_moe_weight"):
        return False  # the grouped-GEMM path runs; the fallback is never used
    table[activation] = silu_and_mul
    return True


def register() -> None:
    """vLLM general-plugin entry point; runs once per process, never raises."""
    if _applied:
        return
    _applied.append("checked")
    try:
        if fix_cpu_moe_activation():
            _applied.append("cpu-moe-activation")
            logger.info("vLLM fix applied: CPU MoE fallback SiLU without a CustomOp")
    except Exception:
        logger.warning("vLLM fixes unavailable: unexpected error", exc_info=True)
