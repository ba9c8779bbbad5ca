"""Tests for worker.tiny_model: the tiny random Qwen3.5-MoE checkpoint (no engine start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker import tiny_model, tiny_model_spec

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDENTICAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "model.safetensors",
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build shared by the session."""
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    """The build's tokenizer, loaded the way vLLM loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """Apply the chat template (text, with the generation prompt unless told otherwise)."""
    kwargs.setdefault("add_generation_prompt", True)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def test_build_is_cached(model_dir: Path) -> None:
    stamp = model_dir / tiny_model.STAMP_NAME
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert tiny_model.build_tiny_model(model_dir) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert json.loads(stamp.read_text())["digest"] == tiny_model.builder_digest()
    assert tiny_model.is_complete(model_dir)


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    other = tiny_model.build_tiny_model(tmp_path / "again", force=True)
    for name in IDENTICAL_FILES:
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny_model.build_tiny_model(tmp_path, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_returns_cached_build(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_model.main(["--out", str(model_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)


def test_config_is_the_real_architecture(model_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["Qwen3_5MoeForConditionalGeneration"]
    assert config.model_type == "qwen3_5_moe"
    text, vision = config.text_config, config.vision_config
    assert text.model_type == "qwen3_5_moe_text"
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (text.hidden_size, text.head_dim, text.num_experts, text.num_experts_per_tok) == (
        128,
        64,
        8,
        2,
    )
    assert text.linear_key_head_dim == text.linear_value_head_dim == 128
    assert text.shared_expert_intermediate_size > 0
    assert text.mtp_num_hidden_layers == 1
    assert text.rope_parameters["mrope_section"] == [3, 3, 2]
    assert text.max_position_embeddings >= 4096
    assert vision.depth == 2 and vision.hidden_size == 64
    assert vision.out_hidden_size == text.hidden_size
    assert text.vocab_size >= len(tokenizer) and text.vocab_size % 64 == 0
    ids = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert json.loads((model_dir / "config.json").read_text())["text_config"]["dtype"] == (
        "bfloat16"
    )


def test_generation_config(model_dir: Path, tokenizer: Any) -> None:
    gen = json.loads((model_dir / "generation_config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids
    assert gen["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (1.0, 0.95, 20)


def test_weights_include_mtp_and_vision(model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {str(f.get_slice(n).get_dtype()) for n in names} == {"BF16"}
    assert "mtp.fc.weight" in names and "mtp.norm.weight" in names
    assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in names
    assert "mtp.layers.0.self_attn.q_proj.weight" in names
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.language_model.layers.3.mlp.experts.0.gate_proj.weight" in names
    assert "model.visual.merger.linear_fc2.weight" in names
    assert "lm_head.weight" in names


def test_added_tokens_are_single_tokens(tokenizer: Any) -> None:
    for content, special in tiny_model_spec.ADDED_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(content)
        assert token_id == tiny_model_spec.token_ids()[content]
        assert tokenizer.encode(f"a{content}b", add_special_tokens=False)[1] == token_id
        kept = tokenizer.decode([token_id], skip_special_tokens=True)
        assert kept == ("" if special else content)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert 2000 <= len(tokenizer) <= 4096


def test_tokenizer_round_trips(tokenizer: Any) -> None:
    text = 'Héllo wörld 日本語 🙂\n\tdef f(x): return {"k": [1, 2]}  # done'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merges do something


def test_template_files_agree(model_dir: Path, tokenizer: Any) -> None:
    template = tiny_model_spec.CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    assert (model_dir / "chat_template.jinja").read_text(encoding="utf-8") == template
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == template


def test_template_thinking_on_and_off(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prefix = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(tokenizer, messages) == prefix + "<|im_start|>assistant\n<think>\n"
    assert render(tokenizer, messages, enable_thinking=False) == (
        prefix + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render(tokenizer, messages, add_generation_prompt=False) == prefix


def test_template_tools_calls_and_results(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "I need the tool.",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 25}'},
    ]
    text = render(tokenizer, messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    assert "</IMPORTANT>\n\nYou are a weather bot.<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI need the tool.\n</think>\n\nChecking.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
        '<tool_call>\n<function=get_weather>\n{"city": "Rome"}\n</function>\n</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n"
    )


def test_template_drops_reasoning_of_earlier_turns(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "easy"},
        {"role": "user", "content": "2+2?"},
    ]
    earlier = "<|im_start|>assistant\n2<|im_end|>\n"
    assert earlier in render(tokenizer, messages)
    kept = render(tokenizer, messages, preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\neasy\n</think>\n\n2<|im_end|>\n" in kept
    vllm_style = [messages[0], {"role": "assistant", "content": "2", "reasoning": "easy"}]
    assert render(tokenizer, vllm_style, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\neasy\n</think>\n\n2<|im_end|>\n"
    )
    inline = [messages[0], {"role": "assistant", "content": "<think>\neasy\n</think>\n\n2"}]
    assert render(tokenizer, inline, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\neasy\n</think>\n\n2<|im_end|>\n"
    )


def test_template_images(tokenizer: Any) -> None:
    content = [
        {"type": "image"},
        {"type": "text", "text": "Compare with"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
    ]
    messages = [{"role": "user", "content": content}]
    text = render(tokenizer, messages)
    assert text.startswith(f"<|im_start|>user\n{IMAGE}Compare with{IMAGE}<|im_end|>\n")
    numbered = render(tokenizer, messages, add_vision_id=True)
    assert f"Picture 1: {IMAGE}Compare withPicture 2: {IMAGE}" in numbered
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2


def test_processor_loads_and_caps_images(model_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.new("RGB", (1280, 960), (10, 200, 30))
    out = processor(text=[f"{IMAGE}What is this?"], images=[image])
    grid = out["image_grid_thw"][0].tolist()
    tokens = grid[0] * grid[1] * grid[2] // 4
    assert 8 <= tokens <= 128
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert out["input_ids"][0].count(image_pad) == tokens
