"""``python -m worker.probe live|ready``: exit 0 if the local worker is live / ready.

The worker rewrites its status file on every heartbeat: ``WorkerSettings.status_file``,
or by default one file per worker, ``<tmp>/qwen-serve-workers/<worker_id>.json``, so
two workers on one host never overwrite each other's (the worker removes its file
when it stops). Live: the file is fresh (the event loop runs and the engine answered
its health check). Ready: live, the last Redis heartbeat succeeded and it is not
draining. Used by Kubernetes exec probes; reads small local files, so it is fast.

The probe reads ``QS_STATUS_FILE`` if set, else the file of ``QS_WORKER_ID`` if set,
else the freshest file in the default directory: in a container the one worker's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qwen_serve.settings import WorkerSettings

STATUS_DIR_NAME = "qwen-serve-workers"


def status_dir() -> Path:
    """Where workers write their status files by default."""
    return Path(tempfile.gettempdir()) / STATUS_DIR_NAME


def status_path(settings: WorkerSettings) -> Path:
    """This worker's status file."""
    if settings.status_file:
        return Path(settings.status_file)
    return status_dir() / f"{settings.worker_id}.json"


def write_status(path: str | Path, **status: Any) -> None:
    """Atomically replace the status file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"time": time.time(), **status}))
    tmp.replace(target)


def remove_status(path: str | Path) -> None:
    """Remove the status file of a worker that stops (a missing one is fine)."""
    Path(path).unlink(missing_ok=True)


def check(kind: str, path: str | Path, max_age_s: float) -> tuple[bool, str]:
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


def probed_path(env_settings: WorkerSettings, worker_id_set: bool) -> Path:
    """The status file a probe reads (see the module doc)."""
    if env_settings.status_file or worker_id_set:
        return status_path(env_settings)
    newest, newest_time = status_dir() / "none.json", -1.0
    for candidate in status_dir().glob("*.json"):
        try:
            modified = candidate.stat().st_mtime
        except OSError:  # removed by its worker meanwhile
            continue
        if modified > newest_time:
            newest, newest_time = candidate, modified
    return newest


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("live", "ready"):
        print("usage: python -m worker.probe live|ready", file=sys.stderr)
        sys.exit(2)
    settings = WorkerSettings()
    path = probed_path(settings, "worker_id" in settings.model_fields_set)
    ok, why = check(args[0], path, max_age_s=3 * settings.heartbeat_ttl_s)
    print(why)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
