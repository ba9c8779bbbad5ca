"""How many of a set of time intervals were open at once (the tenant-limit test and
``python -m bench quotas`` judge an in-flight cap by it)."""

from __future__ import annotations


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals open at one moment."""
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most
