"""Rows of docs/reliability.md, recorded by the fault-injection tests.

``QS_RELIABILITY_REPORT=docs/reliability.md .venv/bin/python -m pytest tests/test_faults.py``
reruns every scenario and rewrites the report.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Scenario(Enum):
    """Fault scenarios, in report order."""

    RECLAIM = "worker SIGKILLed with a claimed, unstarted job (taken over)"
    DEAD_LETTER = "job delivered more than max_deliveries times (dead-lettered)"
    WORKER_KILL = "worker SIGKILLed with streams in flight (continued elsewhere)"
    REDIS_RESTART = "redis-server killed and restarted with streams in flight"
    ROUTER_KILL = "router SIGKILLed with streams in flight, then restarted"
    CANCEL_BURST = "1,000 cancellations in a burst"
    OVERLOAD = "ten times the router's capacity at once"
    DRAIN = "worker SIGTERM (drain) with streams in flight"


@dataclass
class Outcome:
    """What happened to the requests of one scenario."""

    sent: int
    completed: int
    failed_clear: int
    lost: int
    duplicates: int
    recovery_s: float | None = None


_rows: dict[Scenario, Outcome] = {}


def record(scenario: Scenario, outcome: Outcome) -> None:
    """Remember one scenario's outcome for the report."""
    _rows[scenario] = outcome


def write_report() -> Path | None:
    """Write the report if QS_RELIABILITY_REPORT names a file."""
    target = os.environ.get("QS_RELIABILITY_REPORT")
    if not target or not _rows:
        return None
    lines = [
        "# Reliability",
        "",
        "Produced by `QS_RELIABILITY_REPORT=docs/reliability.md .venv/bin/python -m pytest "
        "tests/test_faults.py` on "
        f"{datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} cores): "
        "real redis-server, two workers with the vLLM CPU engine and the tiny model, a router.",
        "",
        "*Failed (clear)* means the client got a retryable error event or a status "
        "(UNAVAILABLE, RESOURCE_EXHAUSTED, CANCELLED, DEADLINE_EXCEEDED, or ABORTED for a "
        "dead-lettered job). *Lost* counts streams that ended any other way, or complete "
        "streams with missing tokens; *duplicates* counts repeated Started events or extra "
        "tokens. Recovery is the time from the fault to the first successful request after it "
        "(or to the takeover, for the queue scenarios). On 2 cores it varies by several "
        "seconds from run to run: the replacement worker of the worker-kill scenario is "
        "still starting its engine during the scenarios that follow.",
        "",
        "| scenario | sent | completed | failed (clear) | lost | duplicates | recovery |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in Scenario:
        o = _rows.get(scenario)
        if o is None:
            continue
        recovery = f"{o.recovery_s:.1f} s" if o.recovery_s is not None else "n/a"
        lines.append(
            f"| {scenario.value} | {o.sent} | {o.completed} | {o.failed_clear} | {o.lost} | "
            f"{o.duplicates} | {recovery} |"
        )
    path = Path(target)
    path.write_text("\n".join(lines) + "\n")
    return path
