"""Engine profiles: the exact vLLM engine arguments, environment and overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from qwen_serve.settings import WorkerSettings
from worker.profile_args import FLASHINFER_FALLBACK_ARGS, FLASHINFER_FALLBACK_ENV, KV_CACHE_ENV
from worker.profiles import (
    CPU_TINY,
    NVIDIA,
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
    "mm_processor_cache_gb": 0,
    "structured_outputs_config": {"backend": "xgrammar"},
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
    "mm_processor_cache_gb": 0,
    "structured_outputs_config": {"backend": "xgrammar"},
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
    settings = WorkerSettings(
        profile=CPU_TINY,
        model="/x",
        capacity=4,
        max_model_len=2048,
        kv_cache_gib=1.0,
        tensor_parallel_size=2,
        dtype="float16",
        enforce_eager=False,
        engine_args={"block_size": 32},
    )
    overrides = Overrides.from_settings(settings)
    assert overrides == Overrides(
        model="/x",
        max_num_seqs=4,
        max_model_len=2048,
        kv_cache_gib=1.0,
        tensor_parallel_size=2,
        dtype="float16",
        enforce_eager=False,
        extra_engine_args={"block_size": 32},
    )
    resolved = resolve(CPU_TINY, overrides)
    assert resolved.engine_args["max_num_seqs"] == 4
    assert resolved.engine_args["tensor_parallel_size"] == 2
    assert "enforce_eager" not in resolved.engine_args  # vLLM's default: graphs on
    assert dict(resolved.env) == {KV_CACHE_ENV: "1"}
    # Only what the deployment set is checked against vLLM at start.
    assert dict(resolved.deployment_args) == {
        "block_size": 32,
        "dtype": "float16",
        "max_model_len": 2048,
        "max_num_seqs": 4,
        "model": "/x",
        "tensor_parallel_size": 2,
    }


def test_profile_defaults_are_not_deployment_args() -> None:
    assert dict(resolve(ROCM_TP4).deployment_args) == {}


def test_extra_engine_args_apply_last() -> None:
    overrides = Overrides(max_num_seqs=4, extra_engine_args={"max_num_seqs": 64})
    assert resolve(ROCM_TP4, overrides).engine_args["max_num_seqs"] == 64


def test_nvidia_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved = resolve(NVIDIA)
    args = dict(resolved.engine_args)
    assert (args["tensor_parallel_size"], args["dtype"]) == (1, "float16")
    assert args["max_model_len"] == 256000
    assert args["skip_mm_profiling"] is True
    # No flashinfer here (nor on the device machine): vLLM's Triton kernels are chosen.
    assert {k: args[k] for k in FLASHINFER_FALLBACK_ARGS} == dict(FLASHINFER_FALLBACK_ARGS)
    assert dict(resolved.env) == dict(FLASHINFER_FALLBACK_ENV)
    # With flashinfer installed, vLLM's defaults stay.
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    with_flashinfer = resolve(NVIDIA)
    assert "gdn_prefill_backend" not in with_flashinfer.engine_args
    assert dict(with_flashinfer.env) == {}


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
    assert set(PROFILES) == {CPU_TINY, ROCM_TP4, NVIDIA}


@pytest.mark.parametrize("name", [CPU_TINY, ROCM_TP4, NVIDIA])
def test_vllm_accepts_the_engine_args(name: str) -> None:
    """AsyncEngineArgs takes every key (constructed only: no engine, GPU or weights)."""
    from vllm import AsyncEngineArgs

    args = engine_args(name, Overrides(mtp_tokens=1 if name == ROCM_TP4 else 0))
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(args) <= fields
    built = AsyncEngineArgs(**args)
    for key, value in args.items():
        assert getattr(built, key) == value


def test_worker_flags_set_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.__main__ import parse_args

    monkeypatch.setenv("QS_ENGINE_ARGS", '{"block_size": 16, "gdn_prefill_backend": "flashinfer"}')
    settings = parse_args(
        [
            "--profile",
            NVIDIA,
            "--tensor-parallel-size",
            "2",
            "--dtype",
            "bfloat16",
            "--gpu-memory-utilization",
            "0.8",
            "--max-num-seqs",
            "64",
            "--enforce-eager",
            "--engine-arg",
            "gdn-prefill-backend=triton",
            "--engine-arg",
            'speculative_config={"method": "mtp", "num_speculative_tokens": 1}',
        ]
    )
    assert (settings.tensor_parallel_size, settings.dtype) == (2, "bfloat16")
    assert (settings.gpu_memory_utilization, settings.capacity) == (0.8, 64)
    assert settings.enforce_eager is True
    # Flags win over QS_ENGINE_ARGS key by key.
    assert settings.engine_args == {
        "block_size": 16,
        "gdn_prefill_backend": "triton",
        "speculative_config": {"method": "mtp", "num_speculative_tokens": 1},
    }
    args = resolve(NVIDIA, Overrides.from_settings(settings)).engine_args
    assert (args["tensor_parallel_size"], args["max_num_seqs"], args["block_size"]) == (2, 64, 16)


def test_worker_flag_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tensor-parallel-size", "0"])
    assert "tensor_parallel_size: Input should be greater than or equal to 1" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("QS_ENGINE_ARGS", "not json")
    with pytest.raises(SystemExit):
        parse_args([])
    assert '"engine_args"' in capsys.readouterr().err
    monkeypatch.delenv("QS_ENGINE_ARGS")

    with pytest.raises(SystemExit):
        parse_args(["--engine-arg", "no-equals-sign"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "float8"])
    assert "--dtype" in capsys.readouterr().err


def test_worker_help_lists_the_engine_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--tensor-parallel-size",
        "--dtype",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--max-num-seqs",
        "--enforce-eager",
        "--engine-arg KEY=VALUE",
        "QS_ENGINE_ARGS",
    ):
        assert flag in text
