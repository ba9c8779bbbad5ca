"""worker/vllm_fixes.py: each fix does what vLLM meant, and only where vLLM needs it."""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.activation import SiluAndMul

from worker import vllm_fixes


def test_the_replacement_silu_computes_what_vllms_custom_op_does() -> None:
    x = torch.randn(5, 3, 16)
    with set_current_vllm_config(VllmConfig()):
        expected = SiluAndMul().forward_native(x)
    torch.testing.assert_close(vllm_fixes.silu_and_mul(x), expected)


def test_the_moe_fix_applies_only_where_the_fallback_builds_a_custom_op() -> None:
    try:
        from vllm.model_executor.layers.fused_moe import cpu_fused_moe
    except ImportError:  # vLLM 0.32: no such fallback table
        assert vllm_fixes.fix_cpu_moe_activation() is False
        return
    applied = vllm_fixes.fix_cpu_moe_activation()
    assert applied == (not hasattr(torch.ops._C, "prepack_moe_weight"))
    table = cpu_fused_moe._CPU_MOE_ACT_FN
    if applied:
        assert table[cpu_fused_moe.MoEActivation.SILU] is vllm_fixes.silu_and_mul
