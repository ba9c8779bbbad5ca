"""What the tiny Qwen3.5-MoE checkpoint is: its sizes, token ids and JSON files.

The constants and the contents of ``config.json``, ``tokenizer_config.json``,
``generation_config.json`` and the processor configs, for ``worker/tiny_model.py``
(which builds the checkpoint and describes it). Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

SEED: Final = 20260311
CHAT_TEMPLATE_PATH: Final = Path(__file__).resolve().parent / "assets" / "chat_template.jinja"
BPE_VOCAB_SIZE: Final = 3000  # incl. the 256-symbol byte alphabet
VOCAB_MULTIPLE: Final = 64
# Qwen's added tokens in Qwen's id order; True = special (dropped by skip_special_tokens).
ADDED_TOKENS: Final[tuple[tuple[str, bool], ...]] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)  # fmt: skip
# fmt: off
TEXT_CONFIG: Final[dict[str, Any]] = {
    "model_type": "qwen3_5_moe_text", "dtype": "bfloat16", "hidden_size": 128,
    "num_hidden_layers": 4, "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "attn_output_gate": True,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32",
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "router_aux_loss_coef": 0.001, "mlp_only_layers": [],
    "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "initializer_range": 0.02, "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
        "mrope_interleaved": True, "mrope_section": [3, 3, 2],
    },
}
VISION_CONFIG: Final[dict[str, Any]] = {
    "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
    "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16,
    "temporal_patch_size": 2, "spatial_merge_size": 2,
    "out_hidden_size": 128,  # = text hidden_size
    "num_position_embeddings": 256,  # a 16 x 16 grid, interpolated per image
    "deepstack_visual_indexes": [], "initializer_range": 0.02,
}
_TOKEN_PIXELS: Final = (16 * 2) ** 2  # pixels per vision token: (patch_size * merge_size) ** 2
_VISION_COMMON: Final[dict[str, Any]] = {
    "processor_class": "Qwen3VLProcessor", "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}
IMAGE_PROCESSOR: Final[dict[str, Any]] = _VISION_COMMON | {
    "image_processor_type": "Qwen2VLImageProcessor",
    "size": {"shortest_edge": 8 * _TOKEN_PIXELS, "longest_edge": 128 * _TOKEN_PIXELS},
}
VIDEO_PROCESSOR: Final[dict[str, Any]] = _VISION_COMMON | {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "size": {"shortest_edge": 4 * _TOKEN_PIXELS, "longest_edge": 256 * _TOKEN_PIXELS},
    "fps": 2, "min_frames": 2, "max_frames": 16, "do_sample_frames": True,
    "cap_pixels_per_frame": True,
}
# Qwen3.5 model card, thinking mode / general tasks (as in the repo's generation_config.json).
SAMPLING_DEFAULTS: Final[dict[str, Any]] = {
    "do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 20,
}
# fmt: on


def token_ids() -> dict[str, int]:
    """Ids of the added tokens (they follow the BPE vocab in ``ADDED_TOKENS`` order)."""
    return {content: BPE_VOCAB_SIZE + i for i, (content, _) in enumerate(ADDED_TOKENS)}


def model_vocab_size() -> int:
    """The model's (padded) vocab size: tokenizer size rounded up to ``VOCAB_MULTIPLE``."""
    size = BPE_VOCAB_SIZE + len(ADDED_TOKENS)
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config() -> dict[str, Any]:
    """The ``Qwen3_5MoeConfig`` kwargs (text/vision nesting as in Qwen3.5-35B-A3B)."""
    ids = token_ids()
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": TEXT_CONFIG
        | {"vocab_size": model_vocab_size(), "eos_token_id": ids["<|endoftext|>"]},
        "vision_config": dict(VISION_CONFIG),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def tokenizer_config(chat_template: str) -> dict[str, Any]:
    """``tokenizer_config.json`` contents (Qwen's settings, template inlined)."""
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "chat_template": chat_template,
        "model_max_length": TEXT_CONFIG["max_position_embeddings"],
    }  # fmt: skip


def generation_config() -> dict[str, Any]:
    """``generation_config.json`` contents: Qwen3.5 sampling defaults and stop ids."""
    ids = token_ids()
    eot = ids["<|endoftext|>"]
    return {
        "bos_token_id": eot,
        "eos_token_id": [ids["<|im_end|>"], eot],
        "pad_token_id": eot,
        **SAMPLING_DEFAULTS,
    }
