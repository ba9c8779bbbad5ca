"""The Node.js example (examples/node/chat.js, @grpc/grpc-js) against the live stack.

It streams a chat with an image and a forced ``get_weather`` call, answers the
call with its local function and streams the follow-up; every event is printed
as a JSON line, which this test reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from qwen_serve_client import Client
from tests.client_helpers import FAILS_MID_STREAM, PROMPT, TOOL_CALL_TOKEN_ID, weather_tool
from tests.conftest import Stack
from tests.npm import ROOT, ensure_installed

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "node"


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs npm)")
    ensure_installed(EXAMPLE)
    return subprocess.run(
        [node, str(EXAMPLE / "chat.js"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_node_client_streams_image_chat_with_a_tool_call(stack: Stack) -> None:
    done = run_example("--target", stack.target, "--force-tool-call", "--prompt", PROMPT)
    assert done.returncode == 0, done.stderr
    events: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines()]
    first = [e for e in events if e["turn"] == 1]
    second = [e for e in events if e["turn"] == 2]

    assert first[0]["type"] == "started" and first[0]["request_id"].startswith("req_")
    assert [e["type"] for e in first[-2:]] == ["finished", "usage"]
    deltas = [e for e in first if e["type"] == "delta"]
    assert deltas[0]["token_ids"][0] == TOOL_CALL_TOKEN_ID
    fragments = [f for d in deltas for f in d.get("tool_calls", [])]
    assert fragments[0]["name"] == "get_weather" and fragments[0]["id"]
    finished = first[-2]
    assert finished["reason"] == "FINISH_REASON_TOOL_CALLS"
    (call,) = finished["tool_calls"]
    assert (call["name"], json.loads(call["arguments_json"])) == ("get_weather", {"city": "Paris"})
    assert "".join(f.get("arguments_fragment", "") for f in fragments) == call["arguments_json"]

    # The image reached the model: the same chat without it has a shorter prompt.
    with Client(stack.target) as client:
        text_only = client.chat(PROMPT, tools=[weather_tool()], think=False, max_tokens=1).collect()
    assert text_only.usage is not None
    assert first[-1]["prompt_tokens"] > text_only.usage.prompt_tokens

    # Turn 2 sent the assistant's call and the tool's result back.
    assert second[0]["type"] == "started" and second[-1]["type"] == "usage"
    assert second[-1]["prompt_tokens"] > first[-1]["prompt_tokens"] + first[-1]["completion_tokens"]


def test_node_client_reports_a_status_error(stack: Stack) -> None:
    done = run_example("--target", stack.target, "--max-tokens", "999999")
    assert done.returncode == 1
    assert done.stderr.startswith("error INVALID_ARGUMENT: sampling.max_tokens")


def test_node_client_sees_the_status_of_a_failure_after_started(stack: Stack) -> None:
    """The Error event is printed, then the call's status repeats it (not OK)."""
    done = run_example("--target", stack.target, "--regex", FAILS_MID_STREAM, "--max-tokens", "200")
    assert done.returncode == 1, done.stderr
    events: list[dict[str, Any]] = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["type"] == "started" and events[-1]["type"] == "error"
    assert events[-1]["field"] == "structured_output.regex"
    assert done.stderr.startswith("error INVALID_ARGUMENT after Started: structured_output.regex")
