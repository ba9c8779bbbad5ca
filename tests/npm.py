"""npm packages for the tests, installed from the committed lockfiles.

``tools/`` (buf) and ``examples/node/`` (grpc-js) each have a package.json and a
package-lock.json; ``node_modules/`` is not in git. A test that needs one runs
``npm ci`` there when node_modules is missing or older than the lockfile, so a
fresh clone works; npm's own cache (~/.npm) makes later installs fast.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ensure_installed(directory: Path) -> Path:
    """``directory/node_modules``, installed with ``npm ci`` if needed (skips without npm)."""
    lock = directory / "package-lock.json"
    stamp = directory / "node_modules" / ".package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return stamp.parent
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (apt-get install npm); it installs the test's packages")
    guard_path = Path(tempfile.gettempdir()) / f"qwen-serve-npm-{directory.name}.lock"
    with guard_path.open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one install at a time
        if not (stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime):
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"npm ci in {directory} failed:\n{done.stderr[-3000:]}")
    return stamp.parent
