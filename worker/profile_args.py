"""An engine profile as vLLM takes it: ``AsyncEngineArgs`` keywords and environment.

:func:`async_engine_args` and :func:`process_env` translate an effective
``EngineProfile`` (``worker/profiles.py``, overrides applied) into what the engine is
started with; ``worker.profiles.resolve`` calls both. This module does not import vLLM.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from worker.profiles import EngineProfile

logger = logging.getLogger(__name__)

KV_CACHE_ENV: Final = "VLLM_CPU_KVCACHE_SPACE"
MTP_METHOD: Final = "mtp"
FLASHINFER_FALLBACK_ARGS: Final[Mapping[str, Any]] = MappingProxyType(
    {"gdn_prefill_backend": "triton"}
)
FLASHINFER_FALLBACK_ENV: Final[Mapping[str, str]] = MappingProxyType(
    {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
)


def async_engine_args(profile: EngineProfile) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": profile.model,
        "served_model_name": profile.served_model_name,
        "dtype": profile.dtype,
        "max_model_len": profile.max_model_len,
        "tensor_parallel_size": profile.tensor_parallel_size,
        "limit_mm_per_prompt": {"image": profile.max_images_per_prompt},
        # No multimodal processor cache: its frontend half records an image as sent to
        # the engine as soon as the image is processed, so a request refused after that
        # (prompt too long, aborted while rendering) leaves it out of step with the
        # engine's half, and the next request with that image fails in the engine.
        "mm_processor_cache_gb": 0,
        "enable_prefix_caching": profile.enable_prefix_caching,
        "reasoning_parser": profile.reasoning_parser,
        "scheduling_policy": profile.scheduling_policy,
    }
    if profile.max_num_seqs is not None:
        args["max_num_seqs"] = profile.max_num_seqs
    if profile.gpu_memory_utilization is not None and profile.device == "gpu":
        args["gpu_memory_utilization"] = profile.gpu_memory_utilization
    if profile.enforce_eager:
        args["enforce_eager"] = True
    if profile.skip_mm_profiling:
        args["skip_mm_profiling"] = True
    # One grammar backend: vLLM's engine compiles every constraint with the backend of the
    # first one it sees, so "auto" (validate with xgrammar, fall back to guidance) let a
    # constraint that only guidance accepted fail in xgrammar's compiler, in the engine.
    structured: dict[str, Any] = {"backend": "xgrammar"}
    if profile.structured_output_in_reasoning:
        structured["enable_in_reasoning"] = True
    args["structured_outputs_config"] = structured
    if profile.mtp_tokens > 0:
        args["speculative_config"] = {
            "method": MTP_METHOD,
            "num_speculative_tokens": profile.mtp_tokens,
        }
    if _flashinfer_missing(profile):
        args.update(FLASHINFER_FALLBACK_ARGS)
    args.update(profile.extra_engine_args)
    return args


def _flashinfer_missing(profile: EngineProfile) -> bool:
    return profile.flashinfer_fallback and importlib.util.find_spec("flashinfer") is None


def process_env(profile: EngineProfile) -> dict[str, str]:
    if _flashinfer_missing(profile):
        return dict(FLASHINFER_FALLBACK_ENV)
    if profile.device != "cpu" or profile.kv_cache_gib is None:
        return {}
    gib = math.ceil(profile.kv_cache_gib)
    if gib != profile.kv_cache_gib:
        logger.warning(
            "%s takes whole GiB: using %d for %s", KV_CACHE_ENV, gib, profile.kv_cache_gib
        )
    return {KV_CACHE_ENV: str(gib)}
