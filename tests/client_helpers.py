"""What the client tests share: the forced tool call, a tool, a PNG, and a CLI runner.

The tiny model has random weights. ``FORCED_CALL_REGEX`` (with thinking off, so
vLLM applies the constraint from the first token) makes the real engine write
a qwen3_coder ``get_weather`` call; the tiny tokenizer has ``<tool_call>`` as an
added token, greedy decoding under the constraint emits that single token, and
vLLM's streaming parser turns the output into tool-call events.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve_client import tool

ROOT = Path(__file__).resolve().parent.parent

FORCED_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)
FORCED_CALL_REGEX = re.escape(FORCED_CALL)
PROMPT = "What is the weather like in the city in this picture?"
TOOL_CALL_TOKEN_ID = 3014
"""``<tool_call>`` in the tiny tokenizer (an added token, as in Qwen3.5)."""
FAILS_MID_STREAM = r"x{120}[^\D0-9]"
"""A regex the engine fails mid-stream: Python's dialect sees Unicode digits in its class,
the engine's grammar none. It streams the x's, then every call ends in INVALID_ARGUMENT."""


def weather_tool() -> pb.Tool:
    """The get_weather tool, as a JSON Schema."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    }
    return tool("get_weather", "Current weather for a city", schema)


def run_cli(*args: str, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m qwen_serve_client ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("QWEN_SERVE_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "qwen_serve_client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )
