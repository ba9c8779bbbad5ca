"""py-spy profiles of the router and the simulated worker under load (hot-path findings).

``python -m bench profile --streams 1000`` starts the capacity stack, drives it
with the load generator and records the router and the simulated worker (the
product's worker loop, ``worker.service.Worker``, on a simulated engine) with
``py-spy record --format raw``. The collapsed stacks are summarised by function:
self samples (where the time is spent) and inclusive samples (what it is spent
under).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import capacity, stack

logger = logging.getLogger(__name__)

TOP = 60


def frame_name(frame: str) -> str:
    """``function (file)`` without the line number, with site-packages paths shortened."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def summarise_collapsed(text: str) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw output."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack_text.split(";") if f]
        if not frames:
            continue
        total += count
        self_samples[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return {
        "samples": total,
        "self": [(name, n / total) for name, n in self_samples.most_common(TOP)] if total else [],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(TOP)] if total else [],
    }


def record(pid: int, seconds: float, out: Path, native: bool = False) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (``native``: with C frames)."""
    binary = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    args = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    args += ["--rate", "100", "--format", "raw", "--output", str(out)]
    args += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def run(
    streams: int, seconds: float = 10.0, out_dir: Path | None = None, native: bool = True
) -> dict[str, Any]:
    """Profile router and simulated worker at ``streams`` concurrent streams."""
    config = capacity.CapacityConfig(levels=(streams,), duration_s=seconds + 6)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-profile-"))
    out_dir = out_dir or log_dir
    cap = capacity.start(config, log_dir)
    data, report = log_dir / "chat.json", log_dir / "report.json"
    data.write_text(json.dumps(capacity.CHAT))
    args = capacity.client_args(cap.router_target, streams, config.duration_s, report, data)
    try:
        client = subprocess.Popen(args, env=stack.bench_env())
        import time

        time.sleep(4)  # past the ramp-up
        targets = {
            "router": cap.procs["router"].popen.pid,
            "sim-worker": cap.procs["sim0"].popen.pid,
        }
        spies = {
            n: record(pid, seconds, out_dir / f"pyspy-{n}.txt", native)
            for n, pid in targets.items()
        }
        for spy in spies.values():
            spy.wait()
        client.wait()
    finally:
        cap.stop()
    result: dict[str, Any] = {"streams": streams, "seconds": seconds, "native": native}
    for name in targets:
        path = out_dir / f"pyspy-{name}.txt"
        result[name] = summarise_collapsed(path.read_text() if path.exists() else "")
    document = json.loads(report.read_text())
    result["steady_tokens_per_s"] = document["streaming"].get("steadyTokensPerSecond", 0.0)
    return result
