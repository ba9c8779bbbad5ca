"""CPU seconds and memory of process trees, measured with psutil.

A :class:`Watch` samples named process trees (a process and its descendants,
e.g. a worker and its vLLM EngineCore) in a background thread: CPU seconds
used between :meth:`Watch.start` and :meth:`Watch.stop` and the peak RSS seen.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import psutil

SAMPLE_S = 0.2


def _tree(pid: int, descendants: bool = True) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)] if descendants else [root]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int, descendants: bool = True) -> float:
    """User plus system CPU seconds of ``pid`` and (unless told not) its live descendants."""
    total = 0.0
    for proc in _tree(pid, descendants):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its live descendants."""
    total = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


@dataclass
class Usage:
    """What one process tree used during a watch."""

    cpu_s: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0

    @property
    def rss_delta(self) -> int:
        """Peak RSS minus RSS at the start."""
        return max(0, self.rss_peak - self.rss_start)


@dataclass
class Watch:
    """Samples the named process trees until stopped."""

    pids: Mapping[str, int]
    descendants: bool = True
    """False: each process alone (a worker without its EngineCore)."""
    usage: dict[str, Usage] = field(default_factory=dict)
    _cpu0: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    started: float = 0.0
    wall_s: float = 0.0

    def start(self) -> None:
        """Take the starting CPU and RSS and begin sampling peaks."""
        for name, pid in self.pids.items():
            rss = tree_rss(pid)
            self.usage[name] = Usage(rss_start=rss, rss_peak=rss)
            self._cpu0[name] = tree_cpu_s(pid, self.descendants)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._update()

    def _update(self) -> None:
        for name, pid in self.pids.items():
            usage = self.usage[name]
            usage.rss_peak = max(usage.rss_peak, tree_rss(pid))
            cpu = tree_cpu_s(pid, self.descendants)
            if cpu:
                usage.cpu_s = max(usage.cpu_s, cpu - self._cpu0[name])

    def stop(self) -> dict[str, Usage]:
        """Stop sampling; returns the usage per name."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._update()
        self.wall_s = time.monotonic() - self.started
        return self.usage


@contextlib.contextmanager
def watching(pids: Mapping[str, int], descendants: bool = True) -> Iterator[Watch]:
    """A started :class:`Watch`, stopped on exit."""
    watch = Watch(dict(pids), descendants)
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()
