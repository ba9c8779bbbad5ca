"""GPU results -> the GPU section of docs/benchmarks.md and docs/gpu.md.

``python -m bench gpu-import DIR [--run NAME]`` copies a GPU run's result files
(``e2e.json``, ``perf.json``, ``real.json`` as ``bench.gpu.run`` wrote them) into
``docs/benchmarks-data/gpu-<NAME>-<phase>.json``; ``python -m bench render`` then
writes the tables from every stored run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu.junit import junit_outcomes

SYSTEM_NAMES = {"a": "ours", "d": "AsyncLLM in-process", "c": "vLLM OpenAI server"}
BASELINE = {
    "commit": "b6ee350",
    "ratio_to_direct": {64: 0.72, 256: 0.73},
    "added_ttft_p50_ms_c1": 49.1 - 27.7,
    "ttft_p99_ratio_c64": 942.7 / 64.2,
}
"""The issue's measurement before this work (the tiny model, bf16, eager, 256 sequences,
the same workload), as ratios to direct AsyncLLM measured in the same run."""


def import_run(source: Path, data_dir: Path, run: str) -> list[Path]:
    """Copy a run's phase results into ``data_dir`` as ``gpu-<run>-<phase>.json``.

    A phase run in parts (``--tag``: ``perf.json`` and ``perf-c.json``, one device call
    each) is stored as one result: their rows and per-system fields merged.
    """
    phases: dict[str, dict[str, Any]] = {}
    for result in sorted(source.glob("*.json")):
        document = json.loads(result.read_text())
        if "phase" not in document:
            continue
        if document["phase"] == "e2e" and not document.get("tests"):
            document["tests"] = junit_outcomes(source / "e2e.xml")
        phase = document["phase"]
        phases[phase] = merge_parts(phases[phase], document) if phase in phases else document
    written = []
    for phase, document in phases.items():
        target = data_dir / f"gpu-{run}-{phase}.json"
        target.write_text(json.dumps(document, indent=1) + "\n")
        written.append(target)
    for profile in source.glob("profile-*.txt"):
        shutil.copy(profile, data_dir / f"gpu-{run}-{profile.name}")
    return written


def merge_parts(first: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Two parts of one phase as one result (the first part's engine arguments and machine)."""
    merged = dict(first)
    merged["rows"] = [*first.get("rows", []), *part.get("rows", [])]
    for key in ("start_s", "errors", "profiles"):
        merged[key] = {**first.get(key, {}), **part.get(key, {})}
    for key in ("client_check", "bare_ceiling"):
        merged[key] = first.get(key) or part.get(key) or []
    merged["wall_s"] = first.get("wall_s", 0) + part.get("wall_s", 0)
    return merged


def runs(data_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{run: {phase: result}} of every stored GPU result."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(data_dir.glob("gpu-*.json")):
        document = json.loads(path.read_text())
        run = path.stem.removeprefix("gpu-").rsplit("-", 1)[0]
        out.setdefault(run, {})[path.stem.rsplit("-", 1)[1]] = document
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Rows by (system, level): one per round."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["system"], r["concurrency"]), []).append(r)
    return grouped


def _by(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """One row per (system, level): with ``--rounds``, the round of median tokens/s."""
    return {key: _median(group) for key, group in _grouped(rows).items()}


def _median(group: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(group, key=lambda r: r["tokens_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def rounds_lines(result: dict[str, Any]) -> list[str]:
    """Every round's tokens/s where a level ran more than once (the tables show the median)."""
    lines = [
        f"- {SYSTEM_NAMES.get(system, system)}, c={c}: "
        + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in group)
        + " tok/s"
        for (system, c), group in sorted(_grouped(result.get("rows", [])).items())
        if len(group) > 1
    ]
    if not lines:
        return []
    head = "Rounds in a row on the same processes (the tables show the median round):"
    return [head, "", *lines, ""]


def throughput_table(result: dict[str, Any]) -> list[str]:
    """Tokens/s, TTFT and ratios per level for every system of one run."""
    by = _by(result.get("rows", []))
    rows = []
    for c in sorted({c for _, c in by}):
        a, d, o = by.get(("a", c)), by.get(("d", c)), by.get(("c", c))
        rows.append(
            (
                c,
                *(f"{r['tokens_per_s']:,.0f}" if r else "-" for r in (a, d, o)),
                _ratio(a, d),
                _ratio(a, o),
                *(f"{r['ttft_p50_ms']:.1f}" if r else "-" for r in (a, d, o)),
                *(f"{r['ttft_p99_ms']:.1f}" if r else "-" for r in (a, d, o)),
            )
        )
    header = (
        "c",
        "tok/s ours",
        "tok/s AsyncLLM",
        "tok/s vLLM OpenAI",
        "ours / AsyncLLM",
        "ours / OpenAI",
        "TTFT p50 ours",
        "p50 AsyncLLM",
        "p50 OpenAI",
        "TTFT p99 ours",
        "p99 AsyncLLM",
        "p99 OpenAI",
    )
    return _table(header, rows)


def _ratio(ours: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
    if not ours or not other or not other["tokens_per_s"]:
        return "-"
    return f"{ours['tokens_per_s'] / other['tokens_per_s']:.2f}x"


def cpu_table(result: dict[str, Any]) -> list[str]:
    """CPU seconds per 1,000 output tokens of each process (``-own``: without children)."""
    rows = []
    order = list(SYSTEM_NAMES)
    for r in sorted(result.get("rows", []), key=lambda r: order.index(r["system"])):
        per = r.get("cpu_s_per_1k_tokens", {})
        cells = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in per.items())
        rows.append((SYSTEM_NAMES.get(r["system"], r["system"]), r["concurrency"], cells))
    return _table(("system", "c", "CPU per 1,000 tokens"), rows)


PATH_COLUMNS = (
    ("router_ttft", "router TTFT mean"),
    ("queue_wait", "queue wait mean"),
    ("worker_ttft", "worker TTFT mean"),
)
STAGE_COLUMNS = (
    ("prepare", "render"),
    ("lease", "lease"),
    ("engine", "engine"),
    ("engine_queue", "vLLM queue"),
    ("engine_prefill", "vLLM prefill"),
    ("jobs_per_claim", "jobs per claim"),
)
"""The worker's stages (runs from F on): its TTFT split, vLLM's own times, claim sizes;
in-process AsyncLLM's rows carry vLLM's times alone (runs after G)."""
STAGE_LEGEND = (
    "Means in ms. The worker's TTFT (claim to first output) is render (claim to the prompt "
    "rendered) + lease (to the lease's answer) + engine (generate called to the first output); "
    "vLLM queue and vLLM prefill split the engine stage by vLLM's own request metrics "
    "(waiting in its scheduler; first step to first token); jobs per claim is how many jobs "
    "each claim that returned any brought."
)


def latency_table(result: dict[str, Any]) -> list[str]:
    """Our path's first token, split by the router's and worker's own metrics (means), and
    vLLM's own times where the run has them (in-process AsyncLLM's too)."""
    measured = [r for r in result.get("rows", []) if r.get("latency_parts_ms")]
    staged = any("engine" in r["latency_parts_ms"] for r in measured)
    columns = PATH_COLUMNS + (STAGE_COLUMNS if staged else ())
    rows = [
        (
            SYSTEM_NAMES.get(r["system"], r["system"]),
            r["concurrency"],
            f"{r['ttft_p50_ms']:.1f}",
            *(r["latency_parts_ms"].get(key, "-") for key, _ in columns),
        )
        for r in measured
        if r["system"] in ("a", "d")
    ]
    header = ("system", "c", "client TTFT p50", *(title for _, title in columns))
    return [*_table(header, rows), *(["", STAGE_LEGEND] if staged else [])]


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _versus(ours: dict[str, Any] | None, other: dict[str, Any] | None, key: str) -> float | None:
    if not ours or not other or not other[key]:
        return None
    return float(ours[key]) / float(other[key])


def targets(perf: dict[str, Any], real: dict[str, Any]) -> list[str]:
    """Issue 13's targets against one run."""
    by, real_by = _by(perf.get("rows", [])), _by(real.get("rows", []))
    rows: list[tuple[str, str, str, str]] = []
    for c in (64, 256):
        ratio = _versus(by.get(("a", c)), by.get(("d", c)), "tokens_per_s")
        rows.append(_target(f"tok/s vs AsyncLLM, c={c}", "≥ 0.95x", ratio, 0.95, "x"))
    a, d = by.get(("a", 1)), by.get(("d", 1))
    added = a["ttft_p50_ms"] - d["ttft_p50_ms"] if a and d else None
    met = None if added is None else added <= 5
    rows.append(("added TTFT p50, c=1", "≤ 5 ms", _shown(added, " ms", signed=True), _verdict(met)))
    p99 = _versus(by.get(("a", 64)), by.get(("d", 64)), "ttft_p99_ms")
    met = None if p99 is None else p99 <= 1.5
    rows.append(("TTFT p99 vs AsyncLLM, c=64", "≤ 1.5x", _shown(p99, "x"), _verdict(met)))
    for c in (64, 256):
        a, o = by.get(("a", c)), by.get(("c", c))
        ratio = _versus(a, o, "tokens_per_s")
        lower = bool(a and o and a["ttft_p99_ms"] < o["ttft_p99_ms"])
        met = None if ratio is None else ratio >= 1.0 and lower
        shown = _shown(ratio, "x")
        if a and o:
            shown += f", TTFT p99 {a['ttft_p99_ms']:.0f} vs {o['ttft_p99_ms']:.0f} ms"
        rows.append(
            (f"vs vLLM OpenAI, c={c}", "≥ 1.0x tok/s, lower TTFT p99", shown, _verdict(met))
        )
    ratio = _versus(real_by.get(("a", 64)), real_by.get(("d", 64)), "tokens_per_s")
    rows.append(_target("real shape: tok/s vs AsyncLLM, c=64", "≥ 0.98x", ratio, 0.98, "x"))
    return _table(("target", "goal", "measured", "verdict"), rows)


def _target(
    name: str, goal: str, value: float | None, floor: float, unit: str
) -> tuple[str, str, str, str]:
    met = None if value is None else value >= floor
    return (name, goal, _shown(value, unit), _verdict(met))


def _shown(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}{unit}" if signed else f"{value:.2f}{unit}"


def gpu_section(data_dir: Path) -> list[str]:
    """The GPU section of docs/benchmarks.md (every stored run, newest last)."""
    stored = runs(data_dir)
    if not stored:
        return ["No GPU run stored yet (`bench/gpu/README.md`)."]
    lines: list[str] = []
    for run, phases in stored.items():
        perf, real = phases.get("perf", {}), phases.get("real", {})
        machine = (perf or real).get("machine", {})
        lines += [f"### Run `{run}`", "", _machine_line(machine), ""]
        if perf:
            lines += ["#### Targets (issue 13)", "", *targets(perf, real), ""]
            lines += ["#### Tiny model: every system, same engine arguments", ""]
            lines += [f"Engine arguments: `{json.dumps(perf.get('engine_args', {}))}`", ""]
            lines += [*throughput_table(perf), "", *rounds_lines(perf)]
            lines += [*latency_table(perf), "", *cpu_table(perf), ""]
            lines += _ceiling(perf)
        if real:
            lines += ["#### The real model's shape (random weights, fp16, TP 1, CUDA graphs)", ""]
            lines += [*throughput_table(real), ""]
    return lines


def _ceiling(perf: dict[str, Any]) -> list[str]:
    lines = []
    rows = perf.get("client_check") or []
    if rows:
        lines += [
            f"Is the load generator the limit? Our path at the widest level from {_procs(rows)}",
            "(the figures above use one client process per 64 streams).",
            "",
        ]
    bare = perf.get("bare_ceiling") or []
    if bare:
        lines += [
            "The load generator's own ceiling, against a bare grpc.aio server that streams",
            f"{perf.get('max_tokens', 256)} tokens per call with no engine, router or Redis,",
            f"at the widest level: {_procs(bare)}.",
            "",
        ]
    return lines


def _procs(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['procs']} process(es): {r['tokens_per_s']:,.0f} tok/s" for r in rows)


def _machine_line(machine: dict[str, Any]) -> str:
    if not machine:
        return ""
    return (
        f"{machine.get('gpu', '?')}; {machine.get('cpus', '?')} CPUs; vLLM "
        f"{machine.get('vllm', '?')}; Python {machine.get('python', '?')}."
    )


def e2e_section(data_dir: Path) -> list[str]:
    """docs/gpu.md's results: every end-to-end test's outcome on the GPU, per run."""
    lines: list[str] = []
    for run, phases in runs(data_dir).items():
        e2e = phases.get("e2e")
        if not e2e:
            continue
        tests = e2e.get("tests", [])
        counts: dict[str, int] = {}
        for test in tests:
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        lines += [f"### Run `{run}`", "", _machine_line(e2e.get("machine", {})), ""]
        lines += [
            f"Worker flags: `{' '.join(e2e.get('worker_flags', []))}`",
            "",
            f"Result: {summary}.",
            "",
        ]
        odd = [(t["test"], t["outcome"], t["message"]) for t in tests if t["outcome"] != "passed"]
        if odd:
            lines += [*_table(("test", "outcome", "message"), odd), ""]
    return lines
