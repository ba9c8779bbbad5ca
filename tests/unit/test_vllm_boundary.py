"""worker/vllm_boundary.py against the installed vLLM (CI runs it on 0.32 and on 0.23).

Each test holds on every supported version: the boundary's per-version behaviour is
what makes them hold. No engine is started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.tokenizers import get_tokenizer

from worker import vllm_boundary as vb

CALL = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return get_tokenizer(str(tiny_model))


def counted(tokenizer: Any, text: str, thinking: bool, chunk: int = 1) -> tuple[int, int]:
    """(reasoning tokens, all tokens) of ``text`` fed in chunks through a fresh parser."""
    cls = vb.parser_class("qwen3_coder", "qwen3", True, "tiny", tokenizer)
    kwargs = {} if thinking else {"enable_thinking": False}
    parser = cls(tokenizer, None, chat_template_kwargs=kwargs)
    counter = vb.ReasoningCounter(parser)
    request = vb.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], model="m")
    opened = "<|im_start|>assistant\n<think>\n" + ("" if thinking else "\n</think>\n\n")
    prompt = tokenizer.encode(opened, add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        text_part = tokenizer.decode(part, skip_special_tokens=False)
        parser.parse_delta(text_part, part, request, prompt, finished=start + chunk >= len(ids))
        counter.feed(part, prompt)
    return counter.count(), len(ids)


def test_version_is_in_the_supported_range() -> None:
    low, high = vb.SUPPORTED
    assert low <= vb.version_tuple() <= high
    assert vb.version_tuple("0.32.0+cpu") == (0, 32)
    assert vb.version_tuple("garbage") == (0, 0)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_all_reasoning_counts_every_token(tokenizer: Any, chunk: int) -> None:
    reasoning, total = counted(tokenizer, "thinking and thinking on", True, chunk)
    assert reasoning == total > 0


@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_reasoning_ends_at_think_close(tokenizer: Any, chunk: int) -> None:
    head = tokenizer.encode("abc def", add_special_tokens=False)
    reasoning, total = counted(tokenizer, "abc def</think>\n\nhello", True, chunk)
    assert reasoning == len(head) < total


def test_a_tool_call_inside_reasoning_ends_it(tokenizer: Any) -> None:
    head = tokenizer.encode("abc", add_special_tokens=False)
    assert counted(tokenizer, "abc" + CALL, True)[0] == len(head)


def test_no_reasoning_when_thinking_is_off(tokenizer: Any) -> None:
    assert counted(tokenizer, "abc def</think>\n\nhello", False)[0] == 0


def test_tokens_without_text_yet_are_reasoning_too(tokenizer: Any) -> None:
    """Byte pieces and special tokens decode to no text, but they are reasoning tokens."""
    ids = [319, 1077, 2344, 130, 3046, 136, 216, 3062, 669]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert counted(tokenizer, text, True)[0] == len(
        tokenizer.encode(text, add_special_tokens=False)
    )


def test_reasoning_ended_for_structured_output(tokenizer: Any) -> None:
    cls = vb.parser_class("qwen3_coder", "qwen3", True, "tiny", tokenizer)
    request = vb.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], model="m")
    open_think = tokenizer.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    closed = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    parser = cls(tokenizer, None, chat_template_kwargs={})
    assert vb.reasoning_ended(request, parser, open_think) is False
    assert vb.reasoning_ended(request, parser, closed) is True
    no_reasoning = request.model_copy(update={"include_reasoning": False})
    assert vb.reasoning_ended(no_reasoning, parser, open_think) is True


def test_unfinished_requests_on_either_engine_shape() -> None:
    newer = SimpleNamespace(get_num_unfinished_requests=lambda: 3)
    older = SimpleNamespace(output_processor=SimpleNamespace(get_num_unfinished_requests=lambda: 5))
    assert vb.unfinished_requests(newer) == 3
    assert vb.unfinished_requests(older) == 5


def test_overload_errors_carry_a_message() -> None:
    for cls in vb.OVERLOAD_ERRORS:
        assert issubclass(cls, BaseException)
    if vb.version_tuple() >= (0, 32):
        assert [c.__name__ for c in vb.OVERLOAD_ERRORS] == ["GracefulHTTPError"]


# ------------------------------------------------------------------ engine arguments


def test_engine_args_are_converted_as_vllm_converts_them() -> None:
    args = vb.validate_engine_args(
        {
            "tensor_parallel_size": "2",
            "gdn_prefill_backend": "triton",
            "enforce_eager": True,
            "speculative_config": {"method": "mtp", "num_speculative_tokens": 1},
            "limit_mm_per_prompt": {"image": 2},
            "dtype": "float16",
        }
    )
    assert args["tensor_parallel_size"] == 2
    assert args["gdn_prefill_backend"] == "triton"
    assert args["enforce_eager"] is True
    assert args["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1}
    assert args["limit_mm_per_prompt"] == {"image": 2}
    assert args["dtype"] == "float16"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"tensor_paralel_size": 2}, "tensor_paralel_size"),
        ({"tensor_parallel_size": "four"}, "tensor_parallel_size"),
        ({"dtype": "float8"}, "dtype"),
        ({"gdn_prefill_backend": "magic"}, "gdn_prefill_backend"),
        ({"enforce_eager": "yes"}, "enforce_eager"),
    ],
)
def test_bad_engine_args_name_the_key(args: dict[str, Any], named: str) -> None:
    with pytest.raises(vb.EngineArgError, match=named):
        vb.validate_engine_args(args)


def test_unknown_engine_arg_suggests_the_field() -> None:
    with pytest.raises(vb.EngineArgError, match="did you mean tensor_parallel_size"):
        vb.validate_engine_args({"tensor_paralel_size": 2})


def test_worker_start_fails_on_a_bad_engine_arg(tmp_path: Path) -> None:
    """The start stops before any engine or model work, with the key in the message."""
    run = subprocess.run(
        [sys.executable, "-m", "worker", "--engine-arg", "tensor_paralel_size=2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "HOME": str(tmp_path), "QS_ENGINE_ARGS": "{}"},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "unknown engine argument 'tensor_paralel_size'" in run.stderr
    assert "Traceback" not in run.stderr
