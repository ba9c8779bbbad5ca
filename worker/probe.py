"""``python -m worker.probe live|ready``: exit 0 if the local worker is live / ready.

The worker rewrites its status file on every heartbeat (``WorkerSettings.status_file``).
Live: the file is fresh (the event loop runs and the engine answered its health
check). Ready: live, the last Redis heartbeat succeeded and it is not draining.
Used by Kubernetes exec probes; reads one small file, so it is fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from qwen_serve.settings import WorkerSettings


def write_status(path: str, **status: Any) -> None:
    """Atomically replace the status file."""
    target = Path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"time": time.time(), **status}))
    tmp.replace(target)


def check(kind: str, path: str, max_age_s: float) -> tuple[bool, str]:
    """Whether the worker is ``live`` or ``ready``, with the reason."""
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return False, f"no status: {exc}"
    age = time.time() - float(status.get("time", 0))
    if age > max_age_s:
        return False, f"status is {age:.1f} s old"
    if not status.get("engine_ok", False):
        return False, "engine is not healthy"
    if kind == "ready" and not status.get("redis_ok", False):
        return False, "Redis heartbeat failing"
    if kind == "ready" and status.get("draining", False):
        return False, "draining"
    return True, "ok"


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("live", "ready"):
        print("usage: python -m worker.probe live|ready", file=sys.stderr)
        sys.exit(2)
    settings = WorkerSettings()
    ok, why = check(args[0], settings.status_file, max_age_s=3 * settings.heartbeat_ttl_s)
    print(why)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
