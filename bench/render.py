"""Writes docs/benchmarks.md (tables, targets) and the PNG plots from the saved results.

Results live as JSON in ``docs/benchmarks-data/``; the hand-written analysis
(``bench/findings.md``: hot-path findings and proposed changes) is included as is.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import psutil

from bench import (
    before_after,
    placement,
    plots,
    priority,
    quotas,
    render_http,
    reserve,
    targets,
)
from bench.gpu import render as gpu_render
from bench.tables import cpu as _cpu
from bench.tables import table

FINDINGS = Path(__file__).with_name("findings.md")
SYSTEMS = {"a": "(a) ours", "b": "(b) vLLM gRPC", "c": "(c) vLLM OpenAI", "d": "(d) AsyncLLM"}


def load(data_dir: Path, name: str) -> dict[str, Any]:
    """A saved result, or {} when that benchmark has not run."""
    path = data_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def engine_section(engine: dict[str, Any]) -> list[str]:
    """Benchmark 1's tables."""
    if not engine:
        return ["Not run yet: `python -m bench engine`."]
    wl = engine["workload"]
    lines = [
        f"Workload: distinct {wl['prompt_tokens']}-token prompts (token ids), "
        f"{wl['max_tokens']} output tokens each (greedy, `ignore_eos`); requests per level "
        + ", ".join(f"{n} at concurrency {c}" for c, n in sorted(wl["requests"].items()))
        + (" (**--quick**)" if wl.get("quick") else "")
        + ".",
        "",
        "Engine arguments (all four systems): `" + json.dumps(engine["engine_args"]) + "`, "
        f"environment `{json.dumps(engine['engine_env'])}`.",
        "",
    ]
    for key, info in sorted(engine["systems"].items()):
        state = f" — **not run**: {info['reason']}" if info.get("reason") else ""
        lines.append(f"- {SYSTEMS.get(key, key)}: {info['label']}{state}")
    lines.append("")
    header = (
        "system",
        "beside",
        "conc.",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "output tok/s",
        "CPU s per 1k tokens",
        "errors",
        "load avg",
    )
    rows = [
        (
            SYSTEMS.get(r["system"], r["system"]),
            r["phase"],
            r["concurrency"],
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['ttft_p99_ms']:.1f}",
            f"{r['itl_p50_ms']:.1f}",
            f"{r['itl_p99_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            _cpu(r["cpu_s_per_1k_tokens"]),
            r["errors"],
            f"{r['load_avg_1m']:.1f}",
        )
        for r in sorted(engine["rows"], key=lambda r: (r["phase"], r["concurrency"], r["system"]))
    ]
    return [*lines, *table(header, rows)]


def capacity_section(capacity: dict[str, Any]) -> list[str]:
    """Benchmark 2's table."""
    if not capacity:
        return ["Not run yet: `python -m bench capacity`."]
    cfg = capacity["config"]
    lines = [
        f"Simulated streams of {cfg['tokens']} tokens at {cfg['rate']:.0f} tokens/s each; "
        f"every client worker streams back to back for {cfg['duration_s']:.0f} s; "
        f"worker coalescing window {cfg['coalesce_ms']} ms; "
        f"{cfg['sim_workers']} simulated worker(s)"
        + (" (**--quick**)" if cfg.get("quick") else "")
        + ". Delivered tokens/s is over the middle half of each run (no ramp-up or tail). "
        "Delay is per token, from the simulated engine's emit to the client's receipt "
        "(same host clock). CPU is cores used on average over the run.",
        "",
    ]
    header = (
        "path",
        "streams",
        "offered tok/s",
        "delivered tok/s",
        "delay p50 ms",
        "delay p99 ms",
        "TTFT p50 ms",
        "CPU cores",
        "peak RSS MB",
        "errors",
    )
    rows = [
        (
            r["path"],
            r["streams"],
            f"{r['offered_tokens_per_s']:.0f}",
            f"{r['steady_tokens_per_s']:.0f}",
            f"{r['delay_p50_ms']:.1f}",
            f"{r['delay_p99_ms']:.1f}",
            f"{r['ttft_p50_ms']:.0f}",
            _cpu(r["cpu_cores"]),
            ", ".join(f"{n} {v:.0f}" for n, v in r["rss_mb"].items() if n != "client"),
            r["errors"],
        )
        for r in sorted(capacity["rows"], key=lambda r: (r["streams"], r["path"]))
    ]
    idle = ", ".join(f"{n} {v:.0f} MB" for n, v in capacity.get("idle_rss_mb", {}).items())
    return [
        *lines,
        *table(header, rows),
        "",
        f"Idle RSS after warm-up: {idle}.",
        "",
        *cpu_per_token(capacity),
    ]


def cpu_per_token(capacity: dict[str, Any]) -> list[str]:
    """CPU ms per 1,000 delivered tokens per process, and the one-core ceiling it implies."""
    lines = [
        "CPU per 1,000 delivered tokens (ms), and the tokens/s one full core would carry at "
        "that cost (1,000,000 / ms): the processes got only a share of the 2 cores, so this "
        "is the steadier comparison.",
        "",
    ]
    rows = []
    for r in sorted(capacity["rows"], key=lambda r: (r["streams"], r["path"])):
        if r["streams"] < 100 or not r.get("cpu_ms_per_1k_tokens"):
            continue
        costs = {n: v for n, v in r["cpu_ms_per_1k_tokens"].items() if n != "client"}
        server = r["cpu_ms_per_1k_tokens"].get("router" if r["path"] == "router" else "bare", 0)
        rows.append(
            (
                r["path"],
                r["streams"],
                ", ".join(f"{n} {v:.0f}" for n, v in costs.items()),
                f"{sum(costs.values()):.0f}",
                f"{1e6 / server:.0f}" if server else "n/a",
            )
        )
    header = ("path", "streams", "ms per 1k tokens", "total", "router/bare tok/s per core")
    return [*lines, *table(header, rows)]


def _is_app_frame(frame: str) -> bool:
    """A Python frame of the project or its libraries (not the loop, runpy or threading)."""
    path = frame.rpartition("(")[2].rstrip(")")
    skip = ("asyncio/", "<frozen", "threading", "uvloop/", "runpy")
    return path.endswith(".py") and not path.startswith(skip)


def profile_section(profile: dict[str, Any]) -> list[str]:
    """Top functions of the py-spy profiles."""
    if not profile:
        return ["Not run yet: `python -m bench profile`."]
    lines = [
        f"py-spy at {profile['streams']:,} streams for {profile['seconds']:.0f} s "
        f"(router path delivered {profile['steady_tokens_per_s']:.0f} tok/s meanwhile). "
        + (
            "Share of samples, with native frames (`--native`): C functions of gRPC's core, "
            "uvloop, protobuf (upb) and libc appear by name."
            if profile.get("native")
            else "Share of samples; Python frames only (time inside uvloop, gRPC's Cython "
            "core and hiredis shows as the caller)."
        ),
        "",
    ]
    for name in ("router", "sim-worker"):
        data = profile.get(name, {})
        rows = [(f"{share:.1%}", f"`{func}`") for func, share in data.get("self", [])[:12]]
        lines += [f"**{name}** ({data.get('samples', 0)} samples), self time:", ""]
        lines += [*table(("share", "function"), rows), ""]
        shares = [s for _f, s in data.get("inclusive", [])]
        top = max(shares, default=0.0) - 0.005  # frames of the whole main thread (main(), loop)
        inclusive = [(f, s) for f, s in data.get("inclusive", []) if s < top and _is_app_frame(f)]
        rows = [(f"{share:.1%}", f"`{func}`") for func, share in inclusive[:12]]
        lines += [f"**{name}**, inclusive (Python frames below the event loop):", ""]
        lines += [*table(("share", "function"), rows), ""]
    return lines


def before_after_section(result: dict[str, Any]) -> list[str]:
    """An earlier commit against this checkout: router path and time to first token."""
    if not result:
        return ["Not run yet: `python -m bench before-after --against REF`."]
    router = result["router"]
    lines = [
        f"Router path at {router['streams']:,} streams on the simulated engine, "
        f"{router['duration_s']:.0f} s per run, mean of {router['rounds']} round(s) in "
        "alternating order, each on fresh stacks; each version runs its own router, "
        "`ReplyWriter` and simulated worker. CPU is milliseconds per 1,000 delivered "
        "tokens, the steadier figure.",
        "",
    ]
    header = (
        "version",
        "delivered tok/s",
        "delay p50 ms",
        "delay p99 ms",
        "router CPU ms/1k tok",
        "worker CPU ms/1k tok",
        "Redis CPU ms/1k tok",
        "router RSS growth MB",
        "errors",
    )
    rows = [
        (
            r["variant"],
            f"{r['steady_tokens_per_s']:.0f}",
            f"{r['delay_p50_ms']:.0f}",
            f"{r['delay_p99_ms']:.0f}",
            f"{r['router_cpu_ms_per_1k']:.1f}",
            f"{r['sim_cpu_ms_per_1k']:.1f}",
            f"{r['redis_cpu_ms_per_1k']:.1f}",
            f"{r['rss_delta_mb']:.0f}",
            r["errors"],
        )
        for r in before_after.averaged(router)
    ]
    return [*lines, *table(header, rows), "", *_ttft_lines(result["ttft"])]


def _ttft_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "Time to first token of the full path on the real CPU engine: both versions' "
        f"stacks up at once, {result['max_tokens']} output tokens per request, calls "
        "alternating between them.",
        "",
    ]
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        by_key.setdefault((row["system"], row["concurrency"]), []).append(row)
    header = ("version", "conc.", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "tok/s")
    rows = []
    for (system, c), group in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):

        def mean(key: str, group: list[dict[str, Any]] = group) -> float:
            return float(sum(r[key] for r in group) / len(group))

        rows.append(
            (
                system,
                c,
                sum(r["requests"] for r in group),
                f"{mean('ttft_p50_ms'):.1f}",
                f"{mean('ttft_p99_ms'):.1f}",
                f"{mean('itl_p50_ms'):.1f}",
                f"{mean('tokens_per_s'):.0f}",
            )
        )
    return [*lines, *table(header, rows)]


def machine_line() -> str:
    """What the figures were measured on."""
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}; the machine is shared (see the load average)."
    )


def render(data_dir: Path, docs: Path) -> Path:
    """Write docs/benchmarks.md and the plots; returns the document's path."""
    engine, capacity = load(data_dir, "engine_path"), load(data_dir, "capacity")
    profile = load(data_dir, "profile")
    comparison = load(data_dir, "before_after")
    http = load(data_dir, "http_path")
    pictures = plots.write_all(engine, capacity, docs)
    goals = [*targets.all_targets(engine, capacity), render_http.http_target(http)]
    goal_rows = [(t.name, t.goal, t.measured, t.verdict) for t in goals]
    meta = load(data_dir, "meta")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench all` (engine path, router capacity, profiles; about",
        "14 minutes on this 2-core machine, `--quick` about 5) and `python -m bench before-after",
        "--against REF` (an earlier commit beside this checkout, about 5 minutes);",
        "`python -m bench http` (gRPC vs HTTP vs vLLM's OpenAI server, about 10 minutes);",
        "`python -m bench priority` (each priority's first token under a LOW flood, ~4 min);",
        "`python -m bench placement` (prefix-cache hits of multi-turn chats, ~10 min);",
        "`python -m bench quotas` (a tenant's in-flight cap over three routers, ~2 min);",
        "`python -m bench reserve` (full concurrency and the HIGH slot, ~1 min);",
        "`python -m bench render` rewrites this page",
        "from `docs/benchmarks-data/`. Do not edit by hand: the analysis lives in",
        "`bench/findings.md`. Load generator and ghz commands: `loadtest/README.md`.",
        "",
        f"Measured {meta.get('date', '?')} on {machine_line()}",
        "",
        "## Targets",
        "",
        *table(("target", "goal", "measured", "verdict"), goal_rows),
        "",
        *targets.ttft_beside_vllm_servers(engine),
        "",
        "## 1. Engine path: (a) ours vs (b) vLLM gRPC vs (c) vLLM OpenAI vs (d) AsyncLLM",
        "",
        *engine_section(engine),
        "",
        *[f"![{p}]({p})" for p in pictures if p in ("bench-ttft.png", "bench-throughput.png")],
        "",
        "## 2. Router capacity (simulated engine)",
        "",
        *capacity_section(capacity),
        "",
        *[f"![{p}]({p})" for p in pictures if p in ("bench-capacity.png", "bench-delay.png")],
        "",
        "## 3. HTTP door: gRPC vs HTTP (in the router, beside it) vs vLLM's OpenAI server",
        "",
        *render_http.http_section(http),
        "",
        *render_http.prefetch_section(load(data_dir, "http_path_prefetch")),
        "",
        "## 4. Fleet scheduling: priority across the queue",
        "",
        *priority.section(load(data_dir, "priority")),
        "",
        "## 5. Fleet scheduling: prefix-aware placement",
        "",
        *placement.section(load(data_dir, "placement")),
        "",
        "## 6. Fleet scheduling: tenant limits across routers",
        "",
        *quotas.section(load(data_dir, "quotas")),
        "",
        "## 7. Full concurrency: the slot kept for HIGH priority",
        "",
        *reserve.section(load(data_dir, "reserve")),
        "",
        "## Profiles",
        "",
        *profile_section(profile),
        "## Before/after: the hot-path changes against the commit before them",
        "",
        *before_after_section(comparison),
        "",
        "## GPU: NVIDIA H200, vLLM 0.23 (the production image's version)",
        "",
        "Run with `bench/gpu/README.md`'s commands on the device, stored with `python -m",
        "bench gpu-import`. Figures of different runs are not comparable with each other:",
        "compare the ratios within one run.",
        "",
        *gpu_render.gpu_section(data_dir),
        "",
        FINDINGS.read_text() if FINDINGS.exists() else "",
    ]
    out = docs / "benchmarks.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    write_gpu_doc(data_dir, docs)
    return out


GPU_DOC_HEAD = Path(__file__).with_name("gpu") / "README.md"


def write_gpu_doc(data_dir: Path, docs: Path) -> Path:
    """docs/gpu.md: how to run on a GPU (bench/gpu/README.md) and every stored e2e run."""
    head = GPU_DOC_HEAD.read_text() if GPU_DOC_HEAD.exists() else "# GPU runs\n"
    lines = [head.rstrip(), "", "## Results of the end-to-end tests on the GPU", ""]
    lines += gpu_render.e2e_section(data_dir) or ["No run stored yet."]
    out = docs / "gpu.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
