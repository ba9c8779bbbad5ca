"""Proto hygiene with buf (npm package @bufbuild/buf, pinned in tools/package-lock.json).

``buf lint`` checks style and that every element is documented; ``buf breaking``
checks the protos against the committed v1 baseline image
(protos/baseline/v1.binpb). The mutation tests prove both checks bite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.npm import ROOT, ensure_installed

BASELINE = ROOT / "protos" / "baseline" / "v1.binpb"
SERVE_PROTO = Path("protos/qwen_serve/api/v1/serve.proto")


@pytest.fixture(scope="module")
def buf() -> Path:
    """The buf binary from tools/node_modules (npm ci on first use)."""
    return ensure_installed(ROOT / "tools") / ".bin" / "buf"


def run_buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of buf.yaml, the protos and the baseline, to mutate."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / SERVE_PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_buf_lint_passes(buf: Path) -> None:
    done = run_buf(buf, "lint")
    assert done.returncode == 0, done.stdout + done.stderr
    files = run_buf(buf, "ls-files").stdout.split()
    assert files == [str(SERVE_PROTO), "protos/qwen_serve/queue/v1/queue.proto"]


def test_buf_lint_requires_a_comment_on_every_field(buf: Path, workspace: Path) -> None:
    comment = "  // Served model name; empty selects the default model.\n"
    edit(
        workspace,
        comment + "  string model = 1;\n  // Conversation",
        "  string model = 1;\n  // Conversation",
    )
    done = run_buf(buf, "lint", cwd=workspace)
    assert done.returncode != 0
    assert re.search(
        r'serve\.proto:\d+:\d+:Field "model" should have a non-empty comment', done.stdout
    )


def test_buf_breaking_passes_against_the_v1_baseline(buf: Path) -> None:
    done = run_buf(buf, "breaking", "--against", str(BASELINE.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("string client_request_id = 9;", "string client_request_id = 19;",
         'Previously present field "9" with name "client_request_id"'),
        ("string request_id = 1;\n  // The client's id", "string id = 1;\n  // The client's id",
         'changed name from "request_id" to "id"'),
        ("  // Maximum images per prompt.\n  uint32 max_images_per_prompt = 4;\n", "",
         'Previously present field "4" with name "max_images_per_prompt"'),
    ],
    ids=["renumber", "rename", "delete"],
)  # fmt: skip
def test_buf_breaking_catches_breaking_changes(
    buf: Path, workspace: Path, old: str, new: str, message: str
) -> None:
    edit(workspace, old, new)
    against = str(workspace / "protos" / "baseline" / "v1.binpb")
    done = run_buf(buf, "breaking", "--against", against, cwd=workspace)
    assert done.returncode != 0
    assert message in done.stdout


def test_baseline_holds_the_released_v1_api() -> None:
    image = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    files = {f.name: f for f in image.file}
    serve = files["qwen_serve/api/v1/serve.proto"]
    (service,) = serve.service
    assert service.name == "Inference"
    assert [m.name for m in service.method] == ["Chat", "Generate", "Abort", "GetModelInfo"]
    assert "qwen_serve/queue/v1/queue.proto" in files
