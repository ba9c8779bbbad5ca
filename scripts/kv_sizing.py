#!/usr/bin/env python3
"""GPU memory sizing of Qwen3.5-35B-A3B (hybrid Gated DeltaNet + attention) per worker.

    python scripts/kv_sizing.py                       # TP 4 on AMD GPUs (profile rocm-tp4)
    python scripts/kv_sizing.py --config config.json  # a checkpoint's config.json
    python scripts/kv_sizing.py --tp 1 --gpus nvidia --utilization 0.90  # profile nvidia

Prints the per-sequence cache of the 10 full-attention layers (KV, grows with length) and
of the 30 linear-attention layers (conv + recurrent state, fixed), and how many sequences
of ``--tokens`` fit per worker at ``gpu_memory_utilization`` on each GPU of ``--gpus``
(AMD: MI300X and MI250-class; NVIDIA: H100 and H200) at tensor parallel ``--tp``.

The arithmetic follows vLLM's V1 hybrid KV cache (0.32): every layer's cache is paged in
one block pool; the attention block size is raised until one attention page
(block_size x per-token KV) is at least one linear-attention state, which is padded to
the same page size; layers are grouped ten to a group (1 attention + 3 linear groups), so
one block costs a page in each of the 10 shared tensors. A sequence holds ceil(tokens /
block_size) attention blocks plus one state block per linear group. With TP 4 and only two
KV heads, each rank stores one KV head (vLLM replicates KV heads when TP > KV heads).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
KERNEL_BLOCK = 16  # vLLM's default block size; the aligned size is a multiple of it


@dataclass(frozen=True)
class ModelShape:
    """The text model's cache-relevant sizes (``text_config`` of config.json)."""

    full_attention_layers: int = 10
    linear_attention_layers: int = 30
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    cache_dtype_bytes: int = 2  # float16 KV cache and state (--dtype float16, "auto")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a config.json (multimodal configs keep the sizes in ``text_config``)."""
        text = config.get("text_config", config)
        layer_types = text["layer_types"]
        return cls(
            full_attention_layers=layer_types.count("full_attention"),
            linear_attention_layers=layer_types.count("linear_attention"),
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            linear_num_key_heads=text["linear_num_key_heads"],
            linear_num_value_heads=text["linear_num_value_heads"],
            linear_key_head_dim=text["linear_key_head_dim"],
            linear_value_head_dim=text["linear_value_head_dim"],
            linear_conv_kernel_dim=text["linear_conv_kernel_dim"],
        )

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution over q, k and v."""
        keys = self.linear_key_head_dim * self.linear_num_key_heads
        return 2 * keys + self.linear_value_head_dim * self.linear_num_value_heads


@dataclass(frozen=True)
class Gpu:
    """A GPU class: memory one device (one GCD) reports."""

    name: str
    memory_gib: float


# MI250/MI250X: two GCDs of 64 GiB per module, each a separate GPU to ROCm.
GPUS = (Gpu("MI300X", 192.0), Gpu("MI250 (one GCD)", 64.0))
# What nvidia-smi reports: 81,559 MiB (H100 80GB) and 143,771 MiB (H200).
NVIDIA_GPUS = (Gpu("H100 80GB", 79.6), Gpu("H200", 140.4))
GPU_SETS = {"amd": GPUS, "nvidia": NVIDIA_GPUS}
CHECKPOINT_GIB = 40.0  # the GPTQ 8-bit checkpoint (~40 GB) with its replicated small tensors


@dataclass(frozen=True)
class Deployment:
    """Serve settings and the memory that is not cache."""

    tp: int = 4
    tokens: int = 256_000
    utilization: float = 0.95
    weights_gib_per_gpu: float = 10.0  # 40 GB checkpoint / 4, plus replicated small tensors
    overhead_gib_per_gpu: float = 5.0  # activations at the profiling peak, RCCL, graphs

    @classmethod
    def for_tp(cls, tp: int, tokens: int = 256_000, utilization: float = 0.95) -> Deployment:
        """A worker of ``tp`` GPUs: the checkpoint's weights split over them."""
        return cls(tp, tokens, utilization, weights_gib_per_gpu=CHECKPOINT_GIB / tp)


def kv_bytes_per_token(shape: ModelShape, tp: int) -> int:
    """Full-attention KV per token on one rank (all full-attention layers)."""
    heads = max(1, shape.num_key_value_heads // tp)
    return 2 * heads * shape.head_dim * shape.cache_dtype_bytes * shape.full_attention_layers


def kv_bytes_per_token_model(shape: ModelShape) -> int:
    """Full-attention KV per token of the model, counting each KV head once."""
    per_layer = 2 * shape.num_key_value_heads * shape.head_dim * shape.cache_dtype_bytes
    return per_layer * shape.full_attention_layers


def state_bytes_per_layer(shape: ModelShape, tp: int) -> int:
    """One linear-attention layer's state for one sequence on one rank (conv + recurrent)."""
    conv = (shape.conv_dim // tp) * (shape.linear_conv_kernel_dim - 1)
    recurrent = (
        (shape.linear_num_value_heads // tp)
        * shape.linear_value_head_dim
        * shape.linear_key_head_dim
    )
    return (conv + recurrent) * shape.cache_dtype_bytes


def attention_block_tokens(shape: ModelShape, tp: int) -> int:
    """vLLM's aligned attention block size: one page holds at least one layer's state."""
    per_token_layer = kv_bytes_per_token(shape, tp) // shape.full_attention_layers
    blocks = math.ceil(state_bytes_per_layer(shape, tp) / (KERNEL_BLOCK * per_token_layer))
    return KERNEL_BLOCK * blocks


def group_size(shape: ModelShape) -> int:
    """Layers per KV cache group (vLLM groups by the smaller layer count here)."""
    return min(shape.full_attention_layers, shape.linear_attention_layers)


def block_bytes(shape: ModelShape, tp: int) -> int:
    """Bytes one block costs on one rank: a page in each of the group's shared tensors."""
    per_token_layer = kv_bytes_per_token(shape, tp) // shape.full_attention_layers
    return attention_block_tokens(shape, tp) * per_token_layer * group_size(shape)


def blocks_per_sequence(shape: ModelShape, tp: int, tokens: int) -> int:
    """Attention blocks for ``tokens`` plus one state block per linear-attention group."""
    linear_groups = shape.linear_attention_layers // group_size(shape)
    return math.ceil(tokens / attention_block_tokens(shape, tp)) + linear_groups


def sequence_gib_per_gpu(shape: ModelShape, plan: Deployment) -> float:
    """Cache one sequence of ``plan.tokens`` occupies on each GPU, in GiB."""
    blocks = blocks_per_sequence(shape, plan.tp, plan.tokens)
    return blocks * block_bytes(shape, plan.tp) / GIB


def cache_gib_per_gpu(gpu: Gpu, plan: Deployment) -> float:
    """What vLLM can give the cache on one GPU at ``plan.utilization``."""
    budget = gpu.memory_gib * plan.utilization
    return budget - plan.weights_gib_per_gpu - plan.overhead_gib_per_gpu


def sequences_that_fit(shape: ModelShape, gpu: Gpu, plan: Deployment) -> int:
    """Whole sequences of ``plan.tokens`` whose cache fits on every GPU of one worker."""
    return math.floor(cache_gib_per_gpu(gpu, plan) / sequence_gib_per_gpu(shape, plan))


def report(shape: ModelShape, plan: Deployment, gpus: tuple[Gpu, ...] = GPUS) -> str:
    """The sizing as Markdown (docs/deploy.md quotes it)."""
    tp, tokens = plan.tp, plan.tokens
    state_layer = state_bytes_per_layer(shape, tp)
    state_model = state_bytes_per_layer(shape, 1) * shape.linear_attention_layers
    kv_model = kv_bytes_per_token_model(shape)
    lines = [
        f"- full-attention KV: {kv_model:,} B/token for the model "
        f"({kv_model * tokens / GIB:.2f} GiB per {tokens:,}-token sequence); "
        f"on TP {tp} each rank holds {kv_bytes_per_token(shape, tp):,} B/token "
        f"({kv_bytes_per_token(shape, tp) * tokens / GIB:.2f} GiB per sequence per GPU)",
        f"- linear-attention state: {state_model:,} B per sequence for the model "
        f"({state_model / 1024**2:.1f} MiB, any length); {state_layer:,} B per layer per GPU",
        f"- vLLM block: {attention_block_tokens(shape, tp)} tokens, "
        f"{block_bytes(shape, tp):,} B per GPU; a {tokens:,}-token sequence takes "
        f"{blocks_per_sequence(shape, tp, tokens)} blocks = "
        f"{sequence_gib_per_gpu(shape, plan):.3f} GiB per GPU",
        "",
        "| GPU | memory | x utilization | weights | overhead | cache per GPU | sequences |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for gpu in gpus:
        lines.append(
            f"| {gpu.name} | {gpu.memory_gib:.0f} GiB | {gpu.memory_gib * plan.utilization:.1f} GiB"
            f" | {plan.weights_gib_per_gpu:.0f} GiB | {plan.overhead_gib_per_gpu:.0f} GiB"
            f" | {cache_gib_per_gpu(gpu, plan):.1f} GiB"
            f" | {sequences_that_fit(shape, gpu, plan)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="config.json of the checkpoint")
    parser.add_argument("--tokens", type=int, default=Deployment.tokens)
    parser.add_argument("--utilization", type=float, default=Deployment.utilization)
    parser.add_argument("--tp", type=int, default=Deployment.tp, help="GPUs per worker")
    parser.add_argument("--gpus", choices=sorted(GPU_SETS), default="amd")
    args = parser.parse_args(argv)
    shape = ModelShape.from_config(json.loads(args.config.read_text())) if args.config else None
    plan = Deployment.for_tp(args.tp, args.tokens, args.utilization)
    print(report(shape or ModelShape(), plan, GPU_SETS[args.gpus]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
