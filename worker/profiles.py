"""Engine profiles: every vLLM setting the worker uses, in one place.

A profile is a named, frozen set of engine settings. :class:`Overrides` changes
some of them for one deployment (model path, context length, MTP, ...).
:func:`resolve` turns the pair into a :class:`ResolvedProfile`: the keyword
arguments for ``vllm.AsyncEngineArgs``, the environment variables that must be
set before the engine starts (both translated by ``worker/profile_args.py``), and
what the worker reports about itself (parser names, limits). Neither module imports
vLLM.

Profiles:

``cpu-tiny``
    The random tiny checkpoint of the real architecture (``worker/tiny_model.py``)
    on vLLM's CPU build, for tests and local runs. bfloat16 (the CPU linear-attention
    kernel asserts it), eager mode, 8 sequences, 4096 tokens. The KV cache size comes
    from ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB): on CPU ``gpu_memory_utilization`` is a
    share of host RAM and its default refuses to start. Prefix caching puts the hybrid
    (Mamba) cache in ``align`` mode, which requires chunked prefill; chunked prefill and
    a per-request seed kill the CPU engine (``CPU Generator does not use offset``), so
    the profile says ``seed_supported=False`` and the engine rejects seeds.

``rocm-tp4``
    The model card's serve settings for ``btbtyler09/Qwen3.5-35B-A3B-GPTQ-8bit`` on four
    GPUs: float16, tensor parallel 4, ``gpu_memory_utilization`` 0.95, 256000 tokens,
    two images per prompt without multimodal profiling, qwen3 reasoning parser, qwen3_coder
    tool parser with auto tool choice, prefix caching. MTP speculative decoding is off
    unless ``Overrides.mtp_tokens`` > 0 (refused on CPU, where vLLM 0.32 crashes with it).

``nvidia``
    The same model card settings for NVIDIA GPUs: float16, tensor parallel 1 (the
    ~40 GB checkpoint fits one H100/H200), ``gpu_memory_utilization`` 0.90 (CUDA graphs
    need room beside the KV cache), 256000 tokens. Without the flashinfer package it
    selects vLLM's Triton kernels (``gdn_prefill_backend="triton"`` and
    ``VLLM_USE_FLASHINFER_SAMPLER=0``); vLLM 0.23 otherwise dies at the first prefill
    with ``ModuleNotFoundError: flashinfer``.

Every profile uses ``scheduling_policy="priority"`` so that the API's Priority reaches
vLLM (see ``worker.requests.priority``: lower values are served first).

A deployment changes any of it without code: the worker's flags and ``QS_*``
variables for tensor parallelism, dtype, GPU memory share, context length, sequences
and eager mode, and ``--engine-arg KEY=VALUE`` / ``QS_ENGINE_ARGS`` (a JSON object)
for any other ``AsyncEngineArgs`` field, applied last.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

from worker.profile_args import async_engine_args, process_env

if TYPE_CHECKING:
    from qwen_serve.settings import WorkerSettings

logger = logging.getLogger(__name__)

CPU_TINY: Final = "cpu-tiny"
ROCM_TP4: Final = "rocm-tp4"
NVIDIA: Final = "nvidia"
DEFAULT_TINY_MODEL_DIR: Final = ".cache/tiny-qwen3.5"

Device = Literal["cpu", "gpu"]
SchedulingPolicy = Literal["priority", "fcfs"]


@dataclass(frozen=True)
class EngineProfile:
    """A named set of engine settings (see the module docstring)."""

    name: str
    device: Device
    model: str
    served_model_name: str
    dtype: str
    max_model_len: int
    max_num_seqs: int | None
    """Sequences the engine runs at once; None leaves vLLM's default."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    """GPU only; on CPU the KV cache comes from :attr:`kv_cache_gib`."""
    kv_cache_gib: float | None = None
    """CPU only: KV cache size, exported as ``VLLM_CPU_KVCACHE_SPACE``."""
    enforce_eager: bool = False
    max_images_per_prompt: int = 2
    skip_mm_profiling: bool = False
    enable_prefix_caching: bool = True
    reasoning_parser: str = "qwen3"
    tool_parser: str = "qwen3_coder"
    enable_auto_tool_choice: bool = True
    mtp_tokens: int = 0
    """MTP speculative tokens; 0 turns speculative decoding off."""
    scheduling_policy: SchedulingPolicy = "priority"
    seed_supported: bool = True
    """False where a per-request seed would crash the engine (CPU + chunked prefill)."""
    structured_output_in_reasoning: bool = False
    """Constrain reasoning too (vLLM ``enable_in_reasoning``); off: constraints start after
    ``</think>``, as the model card's server does. Tests turn it on to spell reasoning."""
    flashinfer_fallback: bool = False
    """Select vLLM's Triton kernels when the flashinfer package is missing (NVIDIA)."""
    extra_engine_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Overrides:
    """Deployment overrides of a profile; None keeps the profile's value."""

    model: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int | None = None
    dtype: str | None = None
    mtp_tokens: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None
    scheduling_policy: SchedulingPolicy | None = None
    structured_output_in_reasoning: bool | None = None
    extra_engine_args: Mapping[str, Any] = field(default_factory=dict)
    """More ``AsyncEngineArgs`` keywords, applied last (``--engine-arg``, ``QS_ENGINE_ARGS``)."""

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Overrides:
        """The engine overrides among the worker settings (``capacity`` is max_num_seqs)."""
        return cls(
            model=settings.model,
            served_model_name=settings.served_model_name,
            max_num_seqs=settings.capacity,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            dtype=settings.dtype,
            mtp_tokens=settings.mtp_tokens,
            kv_cache_gib=settings.kv_cache_gib,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            structured_output_in_reasoning=settings.structured_output_in_reasoning,
            extra_engine_args=dict(settings.engine_args),
        )


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile with its overrides applied: everything needed to start and describe it."""

    profile: EngineProfile
    engine_args: Mapping[str, Any]
    """Keyword arguments for ``vllm.AsyncEngineArgs``."""
    env: Mapping[str, str]
    """Environment variables to set before the engine starts."""
    deployment_args: Mapping[str, Any] = field(default_factory=dict)
    """The engine arguments a deployment set (overrides and extra arguments): the ones
    checked against vLLM's ``AsyncEngineArgs`` at start."""

    @property
    def name(self) -> str:
        """Profile name."""
        return self.profile.name

    @property
    def model(self) -> str:
        """Model path or hub id."""
        return self.profile.model

    @property
    def served_model_name(self) -> str:
        """Name clients send in the model field."""
        return self.profile.served_model_name

    @property
    def max_model_len(self) -> int:
        """Context length (prompt plus output)."""
        return self.profile.max_model_len

    @property
    def max_images_per_prompt(self) -> int:
        """Images one prompt may carry."""
        return self.profile.max_images_per_prompt

    @property
    def reasoning_parser(self) -> str:
        """vLLM reasoning parser name."""
        return self.profile.reasoning_parser

    @property
    def tool_parser(self) -> str:
        """vLLM tool-call parser name."""
        return self.profile.tool_parser

    @property
    def enable_auto_tool_choice(self) -> bool:
        """Whether the model may call tools on its own (tool_choice auto)."""
        return self.profile.enable_auto_tool_choice

    @property
    def seed_supported(self) -> bool:
        """Whether a per-request seed is safe on this engine."""
        return self.profile.seed_supported


PROFILES: Final[Mapping[str, EngineProfile]] = MappingProxyType(
    {
        CPU_TINY: EngineProfile(
            name=CPU_TINY,
            device="cpu",
            model=DEFAULT_TINY_MODEL_DIR,
            served_model_name="qwen3.5-tiny",
            dtype="bfloat16",
            max_model_len=4096,
            max_num_seqs=8,
            kv_cache_gib=2,
            enforce_eager=True,
            seed_supported=False,
        ),
        ROCM_TP4: EngineProfile(
            name=ROCM_TP4,
            device="gpu",
            model="btbtyler09/Qwen3.5-35B-A3B-GPTQ-8bit",
            served_model_name="qwen3.5-35b-a3b",
            dtype="float16",
            max_model_len=256000,
            max_num_seqs=None,
            tensor_parallel_size=4,
            gpu_memory_utilization=0.95,
            skip_mm_profiling=True,
        ),
        NVIDIA: EngineProfile(
            name=NVIDIA,
            device="gpu",
            model="btbtyler09/Qwen3.5-35B-A3B-GPTQ-8bit",
            served_model_name="qwen3.5-35b-a3b",
            dtype="float16",
            max_model_len=256000,
            max_num_seqs=None,
            tensor_parallel_size=1,
            gpu_memory_utilization=0.90,
            skip_mm_profiling=True,
            flashinfer_fallback=True,
        ),
    }
)


def get_profile(name: str) -> EngineProfile:
    """The profile called ``name``; ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown engine profile {name!r} (known: {known})") from None


def apply_overrides(profile: EngineProfile, overrides: Overrides | None) -> EngineProfile:
    """``profile`` with every set field of ``overrides`` applied."""
    if overrides is None:
        return profile
    changes: dict[str, Any] = {
        name: value
        for name in (
            "model",
            "served_model_name",
            "max_model_len",
            "max_num_seqs",
            "tensor_parallel_size",
            "dtype",
            "mtp_tokens",
            "kv_cache_gib",
            "gpu_memory_utilization",
            "enforce_eager",
            "scheduling_policy",
            "structured_output_in_reasoning",
        )
        if (value := getattr(overrides, name)) is not None
    }
    if overrides.extra_engine_args:
        changes["extra_engine_args"] = {
            **profile.extra_engine_args,
            **overrides.extra_engine_args,
        }
    _check(changes)
    effective = replace(profile, **changes)
    if effective.device == "cpu" and effective.mtp_tokens > 0:
        # vLLM 0.32 CPU: with prefix caching the Mamba "align" pre-copy is a Triton kernel
        # (no CPU backend), and without it the rejection sampler's top-k path indexes out
        # of bounds on the first sampled request (top_k 20 is the model's default).
        raise ValueError("MTP speculative decoding crashes vLLM's CPU engine; use a GPU profile")
    return effective


def _check(changes: Mapping[str, Any]) -> None:
    positive = ("max_model_len", "max_num_seqs", "tensor_parallel_size", "kv_cache_gib")
    for name in positive:
        if name in changes and changes[name] <= 0:
            raise ValueError(f"{name} must be positive, got {changes[name]}")
    if changes.get("mtp_tokens", 0) < 0:
        raise ValueError(f"mtp_tokens must be >= 0, got {changes['mtp_tokens']}")
    utilization = changes.get("gpu_memory_utilization")
    if utilization is not None and not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")


DEPLOYMENT_ARG_NAMES: Final = (
    "model",
    "served_model_name",
    "max_model_len",
    "max_num_seqs",
    "tensor_parallel_size",
    "dtype",
    "gpu_memory_utilization",
    "enforce_eager",
)
"""Override fields that are ``AsyncEngineArgs`` fields of the same name."""


def resolve(profile: EngineProfile | str, overrides: Overrides | None = None) -> ResolvedProfile:
    """Apply ``overrides`` to ``profile`` (or the profile of that name)."""
    base = get_profile(profile) if isinstance(profile, str) else profile
    effective = apply_overrides(base, overrides)
    args = async_engine_args(effective)
    chosen = set(overrides.extra_engine_args) if overrides else set()
    if overrides is not None:
        chosen.update(n for n in DEPLOYMENT_ARG_NAMES if getattr(overrides, n) is not None)
    return ResolvedProfile(
        profile=effective,
        engine_args=MappingProxyType(args),
        env=MappingProxyType(process_env(effective)),
        deployment_args=MappingProxyType({k: args[k] for k in sorted(chosen) if k in args}),
    )


def engine_args(profile: EngineProfile | str, overrides: Overrides | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.AsyncEngineArgs`` of ``profile`` with ``overrides``."""
    return dict(resolve(profile, overrides).engine_args)
