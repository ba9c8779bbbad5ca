"""Section 3 of docs/benchmarks.md (the HTTP door) and its target, from ``http_path.json``."""

from __future__ import annotations

import json
from statistics import mean
from typing import Any

from bench.tables import cpu, table
from bench.targets import Target

SYSTEMS = {
    "a": "(a) ours, gRPC",
    "h": "(h) ours, HTTP in the router",
    "g": "(g) ours, HTTP beside the router",
    "c": "(c) vLLM OpenAI server",
}


def _rows(http: dict[str, Any], system: str, concurrency: int) -> list[dict[str, Any]]:
    return [
        r for r in http.get("rows", []) if r["system"] == system and r["concurrency"] == concurrency
    ]


def _mean(http: dict[str, Any], system: str, concurrency: int, key: str) -> float | None:
    rows = _rows(http, system, concurrency)
    return mean(r[key] for r in rows) if rows else None


def _ratios(http: dict[str, Any], concurrency: int) -> list[float]:
    """(h)/(c) tokens/s per round (the two ran back to back in each round)."""
    ours, theirs = _rows(http, "h", concurrency), _rows(http, "c", concurrency)
    by_round = {r["round"]: r["tokens_per_s"] for r in theirs}
    return [r["tokens_per_s"] / by_round[r["round"]] for r in ours if by_round.get(r["round"])]


def http_target(http: dict[str, Any]) -> Target:
    """(h) output tokens/s over (c)'s at concurrency 32, mean over rounds."""
    name = "HTTP path output tokens/s vs vLLM's OpenAI server, concurrency 32"
    ours, theirs = _mean(http, "h", 32, "tokens_per_s"), _mean(http, "c", 32, "tokens_per_s")
    if not ours or not theirs:
        return Target(name, "≥ 1.0x", "n/a", None)
    per_round = ", ".join(f"{r:.2f}x" for r in _ratios(http, 32))
    measured = f"{ours / theirs:.2f}x ({ours:.0f} vs {theirs:.0f} tok/s; rounds {per_round})"
    return Target(name, "≥ 1.0x", measured, ours >= theirs)


def _summary(http: dict[str, Any]) -> list[str]:
    levels = sorted({r["concurrency"] for r in http["rows"]})
    header = ["conc.", *(f"{SYSTEMS[k]} tok/s" for k in "ahgc"), "h/c", "h/a", "g/h"]
    rows = []
    for c in levels:
        tps = {k: _mean(http, k, c, "tokens_per_s") or 0.0 for k in "ahgc"}

        def ratio(x: str, y: str, tps: dict[str, float] = tps) -> str:
            return f"{tps[x] / tps[y]:.2f}" if tps[y] else "n/a"

        rows.append(
            (
                c,
                *(f"{tps[k]:.0f}" for k in "ahgc"),
                ratio("h", "c"),
                ratio("h", "a"),
                ratio("g", "h"),
            )
        )
    ttft_header = ["conc.", *(f"{SYSTEMS[k]} TTFT p50 ms" for k in "ahgc")]
    ttft_rows = [
        (c, *(f"{_mean(http, k, c, 'ttft_p50_ms') or 0.0:.1f}" for k in "ahgc")) for c in levels
    ]
    return [
        "Means over the rounds:",
        "",
        *table(header, rows),
        "",
        *table(ttft_header, ttft_rows),
    ]


def _detail(http: dict[str, Any]) -> list[str]:
    header = (
        "system",
        "round",
        "conc.",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "output tok/s",
        "CPU s per 1k tokens",
        "errors",
        "load avg",
    )
    rows = [
        (
            SYSTEMS.get(r["system"], r["system"]),
            r["round"],
            r["concurrency"],
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['ttft_p99_ms']:.1f}",
            f"{r['itl_p50_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            cpu(r["cpu_s_per_1k_tokens"]),
            r["errors"],
            f"{r['load_avg_1m']:.1f}",
        )
        for r in sorted(http["rows"], key=lambda r: (r["concurrency"], r["round"], r["system"]))
    ]
    return table(header, rows)


def _vllm_bench(http: dict[str, Any], heading: bool = True) -> list[str]:
    runs = http.get("vllm_bench_serve") or []
    if not runs:
        return []
    keys = (
        ("completed", "requests ok", "{:.0f}"),
        ("failed", "failed", "{:.0f}"),
        ("output_throughput", "output tok/s", "{:.1f}"),
        ("median_ttft_ms", "TTFT p50 ms", "{:.1f}"),
        ("p99_ttft_ms", "TTFT p99 ms", "{:.1f}"),
        ("median_tpot_ms", "TPOT p50 ms", "{:.1f}"),
        ("median_itl_ms", "ITL p50 ms", "{:.1f}"),
        ("p99_itl_ms", "ITL p99 ms", "{:.1f}"),
    )
    rows = [
        (run["label"], *(fmt.format(run["result"].get(k) or 0) for k, _, fmt in keys))
        for run in runs
    ]
    results = table(("server (vllm bench serve)", *(name for _, name, _ in keys)), rows)
    if not heading:
        return results
    return [
        "### vLLM's benchmarking client (`vllm bench serve`, openai-chat backend)",
        "",
        "One run against our HTTP API (in the router) and one against vLLM's OpenAI server, "
        "one after the other, with this command (`python -m bench.vllm_bench_serve` runs it: "
        "the `vllm` console script fails with the CPU distribution):",
        "",
        "```",
        runs[0]["command"],
        "```",
        "",
        *results,
    ]


def _placement(http: dict[str, Any]) -> list[str]:
    rows_in = http.get("placement") or []
    if not rows_in:
        return []
    header = (
        "door",
        "streams",
        "delivered tok/s",
        "TTFT p50 ms",
        "ITL p50 ms",
        "router + beside CPU ms per 1k tokens",
        "each process (and the client), ms per 1k tokens",
        "errors",
    )
    rows = []
    for r in sorted(rows_in, key=lambda r: (r["concurrency"], r["system"])):
        cpu = r["cpu_s_per_1k_tokens"]
        door = cpu.get("router", 0.0) + cpu.get("beside", 0.0)
        rows.append(
            (
                SYSTEMS.get(r["system"], r["system"]),
                r["concurrency"],
                f"{r['tokens_per_s']:.0f}",
                f"{r['ttft_p50_ms']:.1f}",
                f"{r['itl_p50_ms']:.1f}",
                f"{door * 1000:.0f}",
                ", ".join(f"{n} {v * 1000:.0f}" for n, v in cpu.items()),
                r["errors"],
            )
        )
    return [
        "### Placement: the router as the bottleneck (simulated engine)",
        "",
        "`bench.sim_worker` (a SIMULATED engine) streams 64 tokens per request at 20 "
        "tokens/s; each door gets twice its stream count of requests, the doors taking "
        "turns. CPU per 1,000 delivered tokens is the figure that decides where the "
        "listener runs (the clients differ: `loadtest` for gRPC, `bench.http_load` for HTTP).",
        "",
        *table(header, rows),
    ]


def prefetch_section(prefetch: dict[str, Any]) -> list[str]:
    """The prototype worker's run (``python -m bench http --prefetch N``), if any."""
    if not prefetch:
        return []
    n = prefetch["prefetch"]
    return [
        f"### Prototype: a worker that claims {n} jobs beyond max_num_seqs",
        "",
        f"`python -m bench http --prefetch {n}`: the same engine-path run with "
        f"`bench.prefetch_worker`, which lets {n} more jobs wait in vLLM's own scheduler, so a "
        "finished sequence's slot is refilled at the engine's next step (the product worker "
        "refills it after acknowledging the job, claiming the next one and rendering it).",
        "",
        *_summary(prefetch),
        "",
        *_vllm_bench(prefetch, heading=False),
    ]


def http_section(http: dict[str, Any]) -> list[str]:
    """Section 3's text and tables."""
    if not http:
        return ["Not run yet: `python -m bench http`."]
    wl = http["workload"]
    lines = [
        f"Workload: distinct {wl['prompt_tokens']}-token prompts (token ids), "
        f"{wl['max_tokens']} output tokens each (greedy, `ignore_eos`); requests per level "
        + ", ".join(f"{n} at concurrency {c}" for c, n in sorted(wl["requests"].items()))
        + f"; every level {wl['rounds']} times, the four systems taking turns (rotating order).",
        "",
        "Engine arguments (our worker and vLLM's server): `"
        + json.dumps(http["engine_args"])
        + "`.",
        "",
        *(f"- ({k}) {label}" for k, label in sorted(http["systems"].items())),
        "",
    ]
    return [
        *lines,
        *_summary(http),
        "",
        *_detail(http),
        "",
        *_vllm_bench(http),
        "",
        *_placement(http),
    ]
