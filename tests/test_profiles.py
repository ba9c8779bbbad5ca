"""Engine profiles: the exact vLLM engine arguments, environment and overrides."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from worker.profiles import (
    CPU_TINY,
    KV_CACHE_ENV,
    PROFILES,
    ROCM_TP4,
    Overrides,
    engine_args,
    get_profile,
    resolve,
)

TINY_DIR = "/models/tiny"

CPU_TINY_ARGS: dict[str, Any] = {
    "model": TINY_DIR,
    "served_model_name": "qwen3.5-tiny",
    "dtype": "bfloat16",
    "max_model_len": 4096,
    "max_num_seqs": 8,
    "tensor_parallel_size": 1,
    "enforce_eager": True,
    "limit_mm_per_prompt": {"image": 2},
    "enable_prefix_caching": True,
    "reasoning_parser": "qwen3",
    "scheduling_policy": "priority",
}

ROCM_TP4_ARGS: dict[str, Any] = {
    "model": "btbtyler09/Qwen3.5-35B-A3B-GPTQ-8bit",
    "served_model_name": "qwen3.5-35b-a3b",
    "dtype": "float16",
    "tensor_parallel_size": 4,
    "gpu_memory_utilization": 0.95,
    "max_model_len": 256000,
    "limit_mm_per_prompt": {"image": 2},
    "skip_mm_profiling": True,
    "enable_prefix_caching": True,
    "reasoning_parser": "qwen3",
    "scheduling_policy": "priority",
}


def test_cpu_tiny_engine_args() -> None:
    assert engine_args(CPU_TINY, Overrides(model=TINY_DIR)) == CPU_TINY_ARGS


def test_cpu_tiny_env_sizes_the_kv_cache() -> None:
    resolved = resolve(CPU_TINY, Overrides(model=TINY_DIR))
    assert dict(resolved.env) == {KV_CACHE_ENV: "2"}
    assert "gpu_memory_utilization" not in resolved.engine_args
    assert dict(resolve(CPU_TINY, Overrides(kv_cache_gib=3)).env) == {KV_CACHE_ENV: "3"}
    # The variable takes whole GiB: fractions round up.
    assert dict(resolve(CPU_TINY, Overrides(kv_cache_gib=1.5)).env) == {KV_CACHE_ENV: "2"}


def test_cpu_tiny_reports_parsers_limits_and_seed_support() -> None:
    resolved = resolve(CPU_TINY)
    assert resolved.reasoning_parser == "qwen3"
    assert resolved.tool_parser == "qwen3_coder"
    assert resolved.enable_auto_tool_choice
    assert resolved.max_images_per_prompt == 2
    assert resolved.max_model_len == 4096
    assert not resolved.seed_supported


def test_rocm_tp4_engine_args() -> None:
    resolved = resolve(ROCM_TP4)
    assert dict(resolved.engine_args) == ROCM_TP4_ARGS
    assert dict(resolved.env) == {}
    assert resolved.seed_supported
    assert resolved.tool_parser == "qwen3_coder"
    assert resolved.enable_auto_tool_choice


def test_rocm_tp4_mtp_override() -> None:
    args = engine_args(ROCM_TP4, Overrides(mtp_tokens=2))
    assert args == ROCM_TP4_ARGS | {
        "speculative_config": {"method": "mtp", "num_speculative_tokens": 2}
    }
    assert "speculative_config" not in engine_args(ROCM_TP4, Overrides(mtp_tokens=0))


def test_every_override() -> None:
    overrides = Overrides(
        model="/m",
        served_model_name="name",
        max_model_len=1024,
        max_num_seqs=3,
        tensor_parallel_size=2,
        dtype="float32",
        mtp_tokens=1,
        gpu_memory_utilization=0.5,
        scheduling_policy="fcfs",
        extra_engine_args={"seed": 7},
    )
    assert engine_args(ROCM_TP4, overrides) == ROCM_TP4_ARGS | {
        "model": "/m",
        "served_model_name": "name",
        "max_model_len": 1024,
        "max_num_seqs": 3,
        "tensor_parallel_size": 2,
        "dtype": "float32",
        "gpu_memory_utilization": 0.5,
        "scheduling_policy": "fcfs",
        "speculative_config": {"method": "mtp", "num_speculative_tokens": 1},
        "seed": 7,
    }
    resolved = resolve(ROCM_TP4, overrides)
    assert resolved.served_model_name == "name"
    assert resolved.max_model_len == 1024


def test_overrides_from_worker_settings() -> None:
    settings = SimpleNamespace(
        profile=CPU_TINY,
        model="/x",
        served_model_name=None,
        capacity=4,
        max_model_len=2048,
        mtp_tokens=None,
        kv_cache_gib=1.0,
    )
    overrides = Overrides.from_settings(settings)
    assert overrides == Overrides(model="/x", max_num_seqs=4, max_model_len=2048, kv_cache_gib=1.0)
    resolved = resolve(CPU_TINY, overrides)
    assert resolved.engine_args["max_num_seqs"] == 4
    assert dict(resolved.env) == {KV_CACHE_ENV: "1"}


@pytest.mark.parametrize(
    "overrides",
    [
        Overrides(max_model_len=0),
        Overrides(max_num_seqs=-1),
        Overrides(mtp_tokens=-1),
        Overrides(gpu_memory_utilization=1.5),
        Overrides(kv_cache_gib=0),
    ],
)
def test_bad_overrides_are_refused(overrides: Overrides) -> None:
    with pytest.raises(ValueError):
        resolve(ROCM_TP4, overrides)


def test_mtp_is_refused_on_cpu() -> None:
    with pytest.raises(ValueError, match="MTP"):
        resolve(CPU_TINY, Overrides(mtp_tokens=1))
    assert "speculative_config" not in engine_args(CPU_TINY, Overrides(mtp_tokens=0))


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="cpu-tiny"):
        get_profile("tpu-v9")
    assert set(PROFILES) == {CPU_TINY, ROCM_TP4}


@pytest.mark.parametrize("name", [CPU_TINY, ROCM_TP4])
def test_vllm_accepts_the_engine_args(name: str) -> None:
    """AsyncEngineArgs takes every key (constructed only: no engine, GPU or weights)."""
    from vllm import AsyncEngineArgs

    args = engine_args(name, Overrides(mtp_tokens=1 if name == ROCM_TP4 else 0))
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(args) <= fields
    built = AsyncEngineArgs(**args)
    for key, value in args.items():
        assert getattr(built, key) == value
