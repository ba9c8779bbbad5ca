"""A checkpoint directory of the real Qwen3.5-35B-A3B shape, for ``load_format="dummy"``.

``python -m bench.gpu.real_shape TINY_DIR OUT_DIR`` copies the tiny model's tokenizer
and chat template and writes the real model's config: hidden 2048, 40 layers (three
gated-DeltaNet layers to one attention layer), 16 query / 2 KV heads of 256, 256
experts (top 8, intermediate 512) plus a shared expert of 512, vocabulary 248,320 and a
27-block ViT. vLLM then allocates the real weights' shapes with random values: the
model's speed without its 40 GB checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SKIPPED = {"model.safetensors", "config.json", "tiny_model_stamp.json"}
TEXT = {
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "full_attention_interval": 4,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 10,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "vocab_size": 248320,
    "max_position_embeddings": 262144,
}
VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "out_hidden_size": 2048,
}


def write(tiny: Path, out: Path) -> Path:
    """Write the real-shape config into ``out`` beside the tiny model's tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for item in tiny.iterdir():
        if item.is_file() and item.name not in SKIPPED:
            shutil.copy(item, out / item.name)
    config = json.loads((tiny / "config.json").read_text())
    config["text_config"].update(TEXT)
    config["text_config"]["rope_parameters"]["mrope_section"] = [11, 11, 10]
    config["vision_config"].update(VISION)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), Path(sys.argv[2])))
