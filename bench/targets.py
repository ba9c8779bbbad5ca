"""The issue's targets, computed from the benchmark results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """One target with its measured value."""

    name: str
    goal: str
    measured: str
    met: bool | None
    """None when it could not be measured."""

    @property
    def verdict(self) -> str:
        """met / missed / not measured."""
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _row(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def added_ttft(engine: dict[str, Any], concurrency: int) -> Target:
    """Added TTFT p50 of (a) over (d), measured side by side in the (d) phase."""
    rows = engine.get("rows", [])
    ours = _row(rows, system="a", phase="d", concurrency=concurrency)
    floor = _row(rows, system="d", phase="d", concurrency=concurrency)
    name = f"Added TTFT p50 over direct AsyncLLM, concurrency {concurrency}"
    if ours is None or floor is None:
        return Target(name, "≤ 5 ms", "n/a", None)
    added = ours["ttft_p50_ms"] - floor["ttft_p50_ms"]
    measured = f"{added:+.1f} ms ({ours['ttft_p50_ms']:.1f} vs {floor['ttft_p50_ms']:.1f} ms)"
    return Target(name, "≤ 5 ms", measured, added <= 5.0)


def throughput_vs_vllm_grpc(engine: dict[str, Any]) -> Target:
    """(a) output tokens/s over (b)'s at concurrency 32, side by side in the (b) phase."""
    rows = engine.get("rows", [])
    ours = _row(rows, system="a", phase="b", concurrency=32)
    theirs = _row(rows, system="b", phase="b", concurrency=32)
    name = "Output tokens/s vs vLLM's gRPC server, concurrency 32"
    if ours is None or theirs is None or not theirs["tokens_per_s"]:
        reason = engine.get("systems", {}).get("b", {}).get("reason") or "n/a"
        return Target(name, "≥ 0.95x", reason, None)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    measured = f"{ratio:.2f}x ({ours['tokens_per_s']:.0f} vs {theirs['tokens_per_s']:.0f} tok/s)"
    return Target(name, "≥ 0.95x", measured, ratio >= 0.95)


def capacity_rows(capacity: dict[str, Any], streams: int) -> tuple[dict[str, Any] | None, ...]:
    """The router and bare rows at ``streams``."""
    rows = capacity.get("rows", [])
    return _row(rows, path="router", streams=streams), _row(rows, path="bare", streams=streams)


def router_share(capacity: dict[str, Any], streams: int = 1000) -> Target:
    """Router steady delivered tokens/s over the bare ceiling's."""
    router, bare = capacity_rows(capacity, streams)
    name = f"Router delivered tokens/s vs bare grpc.aio, {streams:,} streams"
    if router is None or bare is None or not bare["steady_tokens_per_s"]:
        return Target(name, "≥ 50%", "n/a", None)
    share = router["steady_tokens_per_s"] / bare["steady_tokens_per_s"]
    measured = (
        f"{share:.0%} ({router['steady_tokens_per_s']:.0f} vs "
        f"{bare['steady_tokens_per_s']:.0f} tok/s)"
    )
    return Target(name, "≥ 50%", measured, share >= 0.5)


def router_memory_mb(capacity: dict[str, Any], streams: int = 1000) -> float | None:
    """Router RSS growth over idle at ``streams`` streams, scaled to 1,000 streams."""
    router, _bare = capacity_rows(capacity, streams)
    idle = capacity.get("idle_rss_mb", {}).get("router")
    if router is None or idle is None:
        return None
    return float(max(0.0, router["rss_mb"]["router"] - idle) * 1000 / streams)


def router_memory(capacity: dict[str, Any], streams: int = 1000) -> Target:
    """Router memory per 1,000 streams."""
    per_1k = router_memory_mb(capacity, streams)
    name = "Router memory per 1,000 streams (peak RSS over idle)"
    if per_1k is None:
        return Target(name, "< 50 MB", "n/a", None)
    return Target(name, "< 50 MB", f"{per_1k:.1f} MB", per_1k < 50)


def all_targets(engine: dict[str, Any], capacity: dict[str, Any]) -> list[Target]:
    """Every target of the issue, in its order."""
    return [
        added_ttft(engine, 1),
        added_ttft(engine, 8),
        throughput_vs_vllm_grpc(engine),
        router_share(capacity),
        router_memory(capacity),
    ]


def ttft_beside_vllm_servers(engine: dict[str, Any]) -> list[str]:
    """Context for the TTFT targets: (a) against (b) and (c), side by side in their phases."""
    rows = engine.get("rows", [])
    parts = []
    for other, label in (("b", "vLLM's gRPC server"), ("c", "vLLM's OpenAI server")):
        for c in (1, 8):
            ours = _row(rows, system="a", phase=other, concurrency=c)
            theirs = _row(rows, system=other, phase=other, concurrency=c)
            if ours and theirs:
                parts.append(
                    f"{ours['ttft_p50_ms']:.1f} vs {theirs['ttft_p50_ms']:.1f} ms for {label} "
                    f"at concurrency {c}"
                )
    if not parts:
        return []
    return [
        "For scale, our TTFT p50 beside vLLM's own servers, which pay the same "
        "out-of-process costs: " + "; ".join(parts) + "."
    ]
