"""The qwen-serve CLI (``python -m qwen_serve_client``) against the live stack."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from qwen_serve_dev import devstack
from tests.client_helpers import FORCED_CALL_REGEX, PROMPT, run_cli
from tests.conftest import Stack
from tests.support.images import png

pytestmark = pytest.mark.e2e


def json_events(stdout: str) -> list[dict[str, Any]]:
    """The JSON lines of ``--json`` output."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A picture and a tools file, as a user would have them."""
    picture = tmp_path / "paris.png"
    picture.write_bytes(png())
    tools = tmp_path / "tools.json"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": schema}}]))  # fmt: skip
    return {"image": picture, "tools": tools}


def forced_chat(stack: Stack, files: dict[str, Path], *extra: str, image: bool = True) -> list[str]:
    """A chat whose output is constrained to a get_weather call (see client_helpers)."""
    picture = ["--image", str(files["image"])] if image else []
    return [
        "chat", PROMPT, "--target", stack.target, *picture,
        "--tools", str(files["tools"]), "--no-think", "--regex", FORCED_CALL_REGEX,
        "--temperature", "0", "--max-tokens", "64", *extra,
    ]  # fmt: skip


def test_chat_json_streams_every_event_with_image_and_tools(
    stack: Stack, files: dict[str, Path]
) -> None:
    done = run_cli(*forced_chat(stack, files, "--json"))
    assert done.returncode == 0, done.stderr
    events = json_events(done.stdout)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-3:] == ["finished", "usage", "timing"]
    finished = events[-3]
    assert finished["reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in finished["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})
    ]
    fragments = [f for e in events if e["type"] == "delta" for f in e["tool_calls"]]
    assert "".join(f["arguments_fragment"] for f in fragments) == '{"city": "Paris"}'
    text_only = run_cli(*forced_chat(stack, files, "--json", "--max-tokens", "1", image=False))
    assert text_only.returncode == 0, text_only.stderr
    text_usage = next(e for e in json_events(text_only.stdout) if e["type"] == "usage")
    assert events[-2]["prompt_tokens"] > text_usage["prompt_tokens"]  # the image went along
    assert events[-1]["total_s"] >= events[-1]["first_token_s"] > 0


def test_chat_prints_content_tool_calls_then_usage_and_timing(
    stack: Stack, files: dict[str, Path]
) -> None:
    done = run_cli(*forced_chat(stack, files))
    assert done.returncode == 0, done.stderr
    assert 'tool call get_weather {"city": "Paris"}' in done.stdout
    status = done.stderr.strip().splitlines()[-1]
    assert status.startswith("finished: tool_calls · tokens: prompt ")
    assert "first token" in status and "total" in status and "req_" in status


def test_chat_dims_reasoning_on_a_colour_terminal(stack: Stack) -> None:
    args = ["chat", "Think.", "--target", stack.target, "--think", "--max-tokens", "6"]
    done = run_cli(*args, "--temperature", "0", "--color", "always")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("\033[2m") and re.search(r"\(reasoning [1-9]", done.stderr)
    hidden = run_cli(*args, "--temperature", "0", "--hide-reasoning")
    assert hidden.returncode == 0 and hidden.stdout.strip() == ""


def test_interactive_chat_keeps_the_conversation(stack: Stack) -> None:
    args = ["chat", "-i", "--target", stack.target, "--no-think", "--max-tokens", "3", "--json"]
    done = run_cli(*args, stdin="first question\nsecond question\n/exit\n")
    assert done.returncode == 0, done.stderr
    usage = [e for e in json_events(done.stdout) if e["type"] == "usage"]
    assert len(usage) == 2
    # turn 2 carries turn 1's question and answer
    assert usage[1]["prompt_tokens"] > usage[0]["prompt_tokens"] + usage[0]["completion_tokens"]


def test_prompt_from_stdin_generate_models_and_health(stack: Stack) -> None:
    piped = run_cli("chat", "--target", stack.target, "--max-tokens", "2", stdin="Hello\n")
    assert piped.returncode == 0 and "finished:" in piped.stderr
    gen = run_cli("generate", "--target", stack.target, "--token-ids", "5,6,7", "--json",
                  "--max-tokens", "3", "--ignore-eos")  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    usage = next(e for e in json_events(gen.stdout) if e["type"] == "usage")
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] == 3
    models = run_cli("models", "--target", stack.target, "--json")
    info = json.loads(models.stdout)
    assert info["max_images_per_prompt"] == 2 and info["tool_call_parser"] == "qwen3_coder"
    health = run_cli("health", "--target", stack.target)
    assert health.returncode == 0
    assert health.stdout.splitlines() == ["readiness: SERVING", "liveness: SERVING"]


def test_errors_are_clear_and_have_distinct_exit_codes(stack: Stack) -> None:
    invalid = run_cli("chat", "hi", "--target", stack.target, "--top-p", "3")
    assert invalid.returncode == 2
    assert invalid.stderr.strip() == "error: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]"
    unknown = run_cli("chat", "hi", "--target", stack.target, "--model", "gpt-9")
    assert unknown.returncode == 2 and "error: NOT_FOUND: model: 'gpt-9'" in unknown.stderr
    target = f"127.0.0.1:{devstack.free_port()}"
    down = run_cli("health", "--target", target, "--retries", "0")
    assert down.returncode == 3
    assert down.stderr.startswith("error: UNAVAILABLE: ") and target in down.stderr
    missing = run_cli("chat", "hi", "--target", stack.target, "--image", "/nonexistent.png")
    assert missing.returncode == 2 and "nonexistent.png" in missing.stderr
