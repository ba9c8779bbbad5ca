"""A progress bar on stderr while the load runs (calls done of -n, or time of -z)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from loadtest.runner import CallResult

WIDTH = 40
REDRAW_S = 0.1


class Progress:
    """Counts finished calls and redraws at most every ``REDRAW_S`` seconds."""

    def __init__(self, total: int, duration_s: float, out: TextIO | None = None) -> None:
        self.total = total
        self.duration_s = duration_s
        self.out = out or sys.stderr
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, result: CallResult) -> None:
        """Record one finished call."""
        self.done += 1
        self.errors += bool(result.error)
        self.tokens += result.tokens
        now = time.monotonic()
        if now - self._drawn >= REDRAW_S:
            self._drawn = now
            self.draw(now)

    def fraction(self, now: float) -> float:
        """Share of the run done: by time with -z, by calls otherwise."""
        if self.duration_s:
            return min(1.0, (now - self.started) / self.duration_s)
        return min(1.0, self.done / self.total) if self.total else 1.0

    def line(self, now: float) -> str:
        """The bar's text."""
        frac = self.fraction(now)
        filled = int(WIDTH * frac)
        elapsed = now - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        return (
            f"\r[{'█' * filled}{' ' * (WIDTH - filled)}] {frac * 100:5.1f}%  "
            f"{self.done} calls  {self.errors} errors  {rate:.0f} tok/s  {elapsed:.1f}s"
        )

    def draw(self, now: float | None = None) -> None:
        """Redraw the bar."""
        self.out.write(self.line(time.monotonic() if now is None else now))
        self.out.flush()

    def close(self) -> None:
        """Final redraw and a newline."""
        self.draw()
        self.out.write("\n")
        self.out.flush()
