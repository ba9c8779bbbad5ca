"""The tiny checkpoint's weights: a seeded transformers model plus upstream-named MTP tensors.

transformers has no MTP module, so the MTP layer's weights are made from a seeded
one-layer text model and added to ``model.safetensors`` in the real checkpoint's
naming (see ``worker/tiny_model.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.tiny_model_spec import SEED, VOCAB_MULTIPLE, model_config

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)


def _mtp_tensors(config: Any) -> dict[str, Tensor]:
    """Random MTP weights in the real checkpoint's naming (see module docstring)."""
    import torch
    from transformers import Qwen3_5MoeTextModel

    text = config.text_config.to_dict() | {
        "num_hidden_layers": 1,
        "layer_types": ["full_attention"],
        "vocab_size": VOCAB_MULTIPLE,  # the MTP layer shares the target's embedding
        "eos_token_id": None,
    }
    layer = Qwen3_5MoeTextModel(type(config.text_config)(**text)).layers[0]
    tensors: dict[str, Tensor] = {}
    inter = text["moe_intermediate_size"]
    for name, value in layer.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            for e in range(value.shape[0]):
                tensors[f"mlp.experts.{e}.gate_proj.weight"] = value[e, :inter]
                tensors[f"mlp.experts.{e}.up_proj.weight"] = value[e, inter:]
        elif name.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                tensors[f"mlp.experts.{e}.down_proj.weight"] = value[e]
        else:
            tensors[name] = value
    out = {f"mtp.layers.0.{name}": value for name, value in tensors.items()}
    hidden = text["hidden_size"]
    out["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden) * text["initializer_range"]
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{norm}.weight"] = torch.zeros(hidden)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def write_weights(out: Path) -> None:
    """Seeded transformers model -> ``save_pretrained``; then add the MTP tensors."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    config = Qwen3_5MoeConfig(**model_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16)
        torch.manual_seed(SEED + 1)
        mtp = _mtp_tensors(config)
    model.save_pretrained(out)
    weights_path = out / "model.safetensors"
    tensors = load_file(weights_path)
    if set(tensors) & set(mtp) or len(list(out.glob("*.safetensors"))) != 1:
        raise RuntimeError("unexpected save_pretrained output (sharded or has mtp.*)")
    save_file(tensors | mtp, weights_path, metadata={"format": "pt"})
    weights_path.chmod(0o644)
    logger.info("weights: %d tensors (%d mtp)", len(tensors) + len(mtp), len(mtp))
