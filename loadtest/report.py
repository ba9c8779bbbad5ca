"""ghz's report: the JSON document (``-O json|pretty``) and the text summary.

The JSON keys, units (durations in nanoseconds, histogram marks in seconds)
and statistics (latency percentiles 10/25/50/75/90/95/99 by ghz's rank rule,
an 11-bucket histogram of successful calls) follow ghz. A ``streaming`` object
adds what ghz lacks for token streams: time to first token, inter-token
latency, tokens per second and, with ``--stamped-tokens``, delivery delay.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from loadtest.options import Options
from loadtest.runner import TIMELINE_BIN_NS, CallResult, RunResult

GHZ_PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
STREAM_PERCENTILES = (50, 90, 95, 99)
MAX_DETAILS = 1_000_000


def rank_value(sorted_values: Sequence[int], percentage: float) -> int:
    """ghz's percentile: the value at rank ``p% * n`` (1-based when that is whole)."""
    if not sorted_values:
        return 0
    position = percentage / 100.0 * len(sorted_values)
    index = int(position)
    if position == index:
        index -= 1
    return int(sorted_values[max(0, min(index, len(sorted_values) - 1))])


def distribution(values: Sequence[int]) -> dict[str, Any]:
    """count, mean, min, max and p50/p90/p95/p99 of nanosecond values."""
    ordered = sorted(values)
    out: dict[str, Any] = {"count": len(ordered)}
    if not ordered:
        return out
    out["mean"] = int(sum(ordered) / len(ordered))
    out["min"], out["max"] = int(ordered[0]), int(ordered[-1])
    for p in STREAM_PERCENTILES:
        out[f"p{p}"] = rank_value(ordered, p)
    return out


def histogram(latencies_s: Sequence[float]) -> list[dict[str, float | int]]:
    """ghz's histogram: 10 equal buckets between fastest and slowest (marks in s)."""
    if not latencies_s:
        return []
    fastest, slowest = latencies_s[0], latencies_s[-1]
    width = (slowest - fastest) / 10
    marks = [fastest + width * i for i in range(10)] + [slowest]
    counts = [0] * len(marks)
    bucket = 0
    for value in latencies_s:
        while value > marks[bucket] and bucket < len(marks) - 1:
            bucket += 1
        counts[bucket] += 1
    n = len(latencies_s)
    return [{"mark": m, "count": c, "frequency": c / n} for m, c in zip(marks, counts, strict=True)]


def _options(options: Options) -> dict[str, Any]:
    data: Any = options.data[0] if len(options.data) == 1 else options.data
    return {
        "host": options.host,
        "call": options.call,
        "insecure": options.insecure,
        "total": options.total,
        "concurrency": options.concurrency,
        "rps": options.rps,
        "connections": options.connections,
        "procs": options.procs,
        "duration": int(options.duration_s * 1e9),
        "timeout": int(options.timeout_s * 1e9),
        "skipFirst": options.skip_first,
        "data": data,
        "metadata": options.metadata or None,
        "name": options.name or None,
    }


def _rfc3339(unix_ns: int) -> str:
    return datetime.fromtimestamp(unix_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def steady_rate(timeline: Sequence[int], bin_s: float) -> float:
    """Tokens/s over the middle half of the span in which tokens arrived (no ramp-up/down)."""
    busy = [i for i, n in enumerate(timeline) if n]
    if not busy:
        return 0.0
    first, last = busy[0], busy[-1]
    span = last - first + 1
    lo, hi = first + span // 4, last - span // 4
    window = timeline[lo : hi + 1]
    return sum(window) / (len(window) * bin_s) if window else 0.0


def streaming(
    calls: Sequence[CallResult], total_ns: int, timeline: Sequence[int] = ()
) -> dict[str, Any]:
    """Token metrics over the calls that produced tokens."""
    ttft = [c.ttft_ns for c in calls if c.ttft_ns is not None]
    gaps = [g for c in calls for g in c.gaps_ns]
    tokens = sum(c.tokens for c in calls)
    per_stream = [
        int((c.tokens - 1) * 1e9 / (c.last_token_ns - c.first_token_ns))
        for c in calls
        if c.tokens > 1 and c.last_token_ns > c.first_token_ns
    ]
    out: dict[str, Any] = {
        "outputTokens": tokens,
        "messages": sum(c.messages for c in calls),
        "tokensPerSecond": tokens * 1e9 / total_ns if total_ns else 0.0,
        "timeToFirstToken": distribution(ttft),
        "interTokenLatency": distribution(gaps),
        "streamTokensPerSecond": distribution(per_stream),
    }
    if timeline:
        bin_s = TIMELINE_BIN_NS / 1e9
        out["steadyTokensPerSecond"] = steady_rate(timeline, bin_s)
        out["timeline"] = {"binMs": TIMELINE_BIN_NS // 1_000_000, "tokens": list(timeline)}
    delays = [d for c in calls for d in c.delays_ns]
    if delays:
        out["deliveryDelay"] = distribution(delays)
    return out


def build(options: Options, run: RunResult) -> dict[str, Any]:
    """The ghz JSON report (plus ``streaming``) of one run."""
    calls = run.calls[options.skip_first :]
    ok = sorted(c.latency_ns for c in calls if not c.error)
    report: dict[str, Any] = {
        "name": options.name or None,
        "endReason": run.end_reason,
        "options": _options(options),
        "date": _rfc3339(calls[0].start_unix_ns if calls else 0),
        "count": len(calls),
        "total": run.total_ns,
        "average": int(sum(c.latency_ns for c in calls) / len(calls)) if calls else 0,
        "fastest": ok[0] if ok else 0,
        "slowest": ok[-1] if ok else 0,
        "rps": len(calls) * 1e9 / run.total_ns if run.total_ns else 0.0,
        "errorDistribution": dict(Counter(c.error for c in calls if c.error)),
        "statusCodeDistribution": dict(Counter(c.status for c in calls)),
        "latencyDistribution": [
            {"percentage": p, "latency": rank_value(ok, p)} for p in GHZ_PERCENTILES if ok
        ],
        "histogram": histogram([v / 1e9 for v in ok]),
        "details": [
            {
                "timestamp": _rfc3339(c.start_unix_ns),
                "latency": c.latency_ns,
                "error": c.error,
                "status": c.status,
            }
            for c in calls[:MAX_DETAILS]
        ],
        "tags": options.tags or None,
        "streaming": streaming(calls, run.total_ns, run.timeline),
    }
    return {k: v for k, v in report.items() if v is not None}


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def summary(report: dict[str, Any]) -> str:
    """ghz's text summary, followed by the streaming figures."""
    lines = [
        "",
        "Summary:",
        f"  Count:\t{report['count']}",
        f"  Total:\t{_ms(report['total'])}",
        f"  Slowest:\t{_ms(report['slowest'])}",
        f"  Fastest:\t{_ms(report['fastest'])}",
        f"  Average:\t{_ms(report['average'])}",
        f"  Requests/sec:\t{report['rps']:.2f}",
        "",
        "Response time histogram:",
    ]
    top = max((b["count"] for b in report["histogram"]), default=0) or 1
    for bucket in report["histogram"]:
        bar = "∎" * int(40 * bucket["count"] / top)
        lines.append(f"  {bucket['mark'] * 1e3:.3f} [{bucket['count']}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    lines += [
        f"  {d['percentage']} % in {_ms(d['latency'])} " for d in report["latencyDistribution"]
    ]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{k}]\t{v} responses" for k, v in report["statusCodeDistribution"].items()]
    if report["errorDistribution"]:
        lines += ["", "Error distribution:"]
        lines += [f"  [{v}]\t{k}" for k, v in report["errorDistribution"].items()]
    lines += _streaming_summary(report["streaming"])
    return "\n".join(lines) + "\n"


def _streaming_summary(s: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Streaming:",
        f"  Output tokens:\t{s['outputTokens']} in {s['messages']} messages",
        f"  Tokens/sec:\t{s['tokensPerSecond']:.1f}",
    ]
    if "steadyTokensPerSecond" in s:
        lines.append(
            f"  Steady tokens/sec:\t{s['steadyTokensPerSecond']:.1f} (middle half of the run)"
        )
    names = (
        ("timeToFirstToken", "Time to first token"),
        ("interTokenLatency", "Inter-token latency"),
        ("deliveryDelay", "Delivery delay"),
    )
    for key, label in names:
        d = s.get(key)
        if d and d["count"]:
            lines.append(
                f"  {label}:\tp50 {_ms(d['p50'])}  p90 {_ms(d['p90'])}  "
                f"p99 {_ms(d['p99'])}  max {_ms(d['max'])}"
            )
    per = s["streamTokensPerSecond"]
    if per["count"]:
        lines.append(f"  Per-stream tokens/sec:\tp50 {per['p50']}  p99 {per['p99']}")
    return lines


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as ``summary``, ``json`` or ``pretty`` (indented JSON) text."""
    if fmt == "json":
        return json.dumps(report, separators=(",", ":")) + "\n"
    if fmt == "pretty":
        return json.dumps(report, indent=2) + "\n"
    return summary(report)
