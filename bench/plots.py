"""PNG plots of the benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SYSTEM_NAMES = {"a": "(a) ours", "b": "(b) vLLM gRPC", "c": "(c) vLLM OpenAI", "d": "(d) AsyncLLM"}


def _engine_series(engine: dict[str, Any], key: str) -> dict[str, dict[int, float]]:
    """Per system: concurrency → value; (a) is the mean over its phases."""
    values: dict[str, dict[int, list[float]]] = {}
    for row in engine.get("rows", []):
        values.setdefault(row["system"], {}).setdefault(row["concurrency"], []).append(row[key])
    return {s: {c: sum(v) / len(v) for c, v in by_c.items()} for s, by_c in values.items()}


def engine_bars(
    engine: dict[str, Any], key: str, ylabel: str, title: str, out: Path, log: bool = False
) -> None:
    """Grouped bars: one group per concurrency, one bar per system."""
    series = _engine_series(engine, key)
    levels = sorted({c for by_c in series.values() for c in by_c})
    systems = [s for s in "abcd" if s in series]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(levels))]
        ys = [series[system].get(c, 0.0) for c in levels]
        ax.bar(xs, ys, width, label=SYSTEM_NAMES.get(system, system))
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(levels))])
    ax.set_xticklabels([f"concurrency {c}" for c in levels])
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _by_path(capacity: dict[str, Any], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for path in ("router", "bare"):
        rows = sorted(
            (r for r in capacity.get("rows", []) if r["path"] == path), key=lambda r: r["streams"]
        )
        out[path] = ([r["streams"] for r in rows], [r[key] for r in rows])
    return out


def capacity_throughput(capacity: dict[str, Any], out: Path) -> None:
    """Delivered tokens/s against concurrent streams: router, bare ceiling, offered."""
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = {"router": "router + Redis + sim worker", "bare": "bare grpc.aio (ceiling)"}
    for path, (xs, ys) in _by_path(capacity, "steady_tokens_per_s").items():
        ax.plot(xs, ys, marker="o", label=labels[path])
    xs, offered = _by_path(capacity, "offered_tokens_per_s")["router"]
    ax.plot(xs, offered, linestyle="--", color="grey", label="offered (streams x rate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("delivered tokens/s (steady)")
    ax.set_title("Router capacity (simulated engine)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def capacity_delay(capacity: dict[str, Any], out: Path) -> None:
    """Per-token delivery delay p50/p99 against concurrent streams."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for path, style in (("router", "-"), ("bare", "--")):
        for pct in ("p50", "p99"):
            xs, ys = _by_path(capacity, f"delay_{pct}_ms")[path]
            ax.plot(xs, ys, linestyle=style, marker="o", label=f"{path} {pct}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("emit → client delay per token (ms)")
    ax.set_title("Per-token delivery delay")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_all(engine: dict[str, Any], capacity: dict[str, Any], docs: Path) -> list[str]:
    """Write every plot that has data; returns the file names."""
    written: list[str] = []
    if engine.get("rows"):
        engine_bars(
            engine,
            "ttft_p50_ms",
            "ms (log scale)",
            "Time to first token, p50 ((a): mean of its three phases)",
            docs / "bench-ttft.png",
            log=True,
        )
        engine_bars(
            engine,
            "tokens_per_s",
            "output tokens/s",
            "Output tokens/s",
            docs / "bench-throughput.png",
        )
        written += ["bench-ttft.png", "bench-throughput.png"]
    if capacity.get("rows"):
        capacity_throughput(capacity, docs / "bench-capacity.png")
        capacity_delay(capacity, docs / "bench-delay.png")
        written += ["bench-capacity.png", "bench-delay.png"]
    return written
