"""Markdown pieces shared by the pages ``bench.render`` writes."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def cpu(per_process: dict[str, float]) -> str:
    """CPU figures per process, e.g. ``router 0.12, worker 2.50``."""
    return ", ".join(f"{name} {value:.2f}" for name, value in per_process.items())
