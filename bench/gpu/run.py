"""The device side of a GPU run (``bench/gpu/device.sh`` sets the environment first).

``python -m bench.gpu.run e2e``
    The end-to-end test files (chat with thinking, tools with images, Generate with
    token ids, structured output, cancellation, 64 concurrent streams, ...) against a
    stack whose workers run the ``nvidia`` profile on vLLM 0.23.
``python -m bench.gpu.run perf [--systems a,d,c,clients] [--levels 1,16,64,256]``
    The tiny model (bf16, eager, 256 sequences): our path (a), vLLM's OpenAI server (c)
    and in-process ``AsyncLLM`` (d) with the same engine arguments, the same prompts
    and levels; CPU per process; a py-spy profile of our router and worker; and our
    path from 1, 4 and 8 load-generator processes (is the client the limit?).
``python -m bench.gpu.run real --systems a`` (or ``d``)
    The real Qwen3.5-35B-A3B shape (random weights, fp16, TP 1, CUDA graphs).

Each phase writes ``$OUT/<phase>.json`` (merged into ``docs/benchmarks-data/gpu.json``
by ``python -m bench gpu-render DIR``) and ``$OUT/<phase>-logs.tar.xz``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.engine_path import Launcher, System, make_prompts, summarise
from bench.gpu import measure, real_shape
from bench.gpu.junit import junit_outcomes
from bench.gpu.measure import MAX_TOKENS
from qwen_serve_dev import devstack
from worker.profiles import NVIDIA, Overrides, ResolvedProfile, resolve

logger = logging.getLogger("bench.gpu")

TINY_LEVELS = {1: 3, 16: 32, 64: 128, 256: 512}
"""Concurrency -> requests: two waves at each level (three requests alone), 7-13 s each."""
REAL_LEVELS = {1: 2, 64: 128}
E2E_TIMEOUT_S = 540.0
"""Under the device's 10 minutes per command, so the results still come back."""


PREFILL_TOKENS = {"max_num_batched_tokens": 8192}
"""Prompt tokens per engine step, as k8s/overlays/nvidia deploys it (``vllm serve``'s own
default on H100/H200; an embedded AsyncLLM would get 2048). Every system gets it."""


def tiny_overrides(capacity: int, gpu_share: float) -> Overrides:
    """The tiny model as the issue's baseline ran it: bf16, eager, ``capacity`` sequences."""
    return Overrides(
        model=str(devstack.TINY_MODEL_DIR),
        served_model_name="qwen3.5-tiny",
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=capacity,
        enforce_eager=True,
        gpu_memory_utilization=gpu_share,
        extra_engine_args=PREFILL_TOKENS,
    )


def real_overrides(model: Path, capacity: int) -> Overrides:
    """The real model's shape: fp16, TP 1, CUDA graphs, dummy weights (the profile's rest).

    ``capacity`` sequences (the widest level): fewer CUDA graphs to capture, a shorter start.
    """
    return Overrides(
        model=str(model),
        max_model_len=32768,
        max_num_seqs=capacity,
        extra_engine_args={"load_format": "dummy", **PREFILL_TOKENS},
    )


PROFILE = NVIDIA
"""The engine profile of every run (``--engine-profile cpu-tiny`` smoke-tests this harness
on a machine without a GPU)."""


def worker_flags(overrides: Overrides) -> list[str]:
    """``python -m worker`` flags for the run's profile with ``overrides``."""
    flags = ["--profile", PROFILE]
    named = {
        "model": "--model",
        "served_model_name": "--served-model-name",
        "dtype": "--dtype",
        "max_model_len": "--max-model-len",
        "max_num_seqs": "--capacity",
        "gpu_memory_utilization": "--gpu-memory-utilization",
    }
    for field, flag in named.items():
        value = getattr(overrides, field)
        if value is not None:
            flags += [flag, str(value)]
    if overrides.enforce_eager is not None:
        flags.append("--enforce-eager" if overrides.enforce_eager else "--no-enforce-eager")
    for key, value in overrides.extra_engine_args.items():
        flags += ["--engine-arg", f"{key}={json.dumps(value)}"]
    return flags


# ------------------------------------------------------------------ phases


def e2e(out: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The end-to-end test files against workers on the nvidia profile (``--tests``: -k)."""
    devstack.build_tiny_model()
    flags = worker_flags(tiny_overrides(capacity=64, gpu_share=0.25))
    env = {**os.environ, "QS_DEVSTACK_WORKER_FLAGS": shlex.join(flags)}
    files = [
        "tests/e2e/test_e2e_chat.py",
        "tests/e2e/test_e2e_features.py",
        "tests/unit/test_vllm_boundary.py",
    ]
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs", *files]
    if args.tests:
        command += ["-k", args.tests]
    command.append(f"--junitxml={out / 'e2e.xml'}")
    started = time.monotonic()
    with (out / "e2e.log").open("w") as log:
        try:
            run = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=E2E_TIMEOUT_S
            )
            code = run.returncode
        except subprocess.TimeoutExpired:
            code = -1
    tail = (out / "e2e.log").read_text().splitlines()[-1:] or [""]
    return {
        "worker_flags": flags,
        "exit_code": code,
        "summary": tail[0],
        "wall_s": _since(started),
        "tests": junit_outcomes(out / "e2e.xml"),
    }


def perf(out: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every system on the tiny model, the router/worker profile and the client ceiling."""
    devstack.build_tiny_model()
    overrides = tiny_overrides(capacity=256, gpu_share=0.30)
    levels = _levels(args.levels, TINY_LEVELS)
    resolved = resolve(PROFILE, overrides)
    return _systems(out, log_dir, args, resolved, overrides, levels)


def real(out: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The real model's shape through the systems named (one engine start each, ~3 min)."""
    model = real_shape.write(devstack.build_tiny_model(), devstack.CACHE / "models" / "real-shape")
    levels = _levels(args.levels, REAL_LEVELS)
    overrides = real_overrides(model, max(levels))
    args.systems = [s for s in args.systems if s != "clients"]
    return _systems(out, log_dir, args, resolve(PROFILE, overrides), overrides, levels)


def _systems(
    out: Path,
    log_dir: Path,
    args: argparse.Namespace,
    resolved: ResolvedProfile,
    overrides: Overrides,
    levels: dict[int, int],
) -> dict[str, Any]:
    """Each system of ``args.systems`` in turn: start, warm, ``args.rounds`` runs of every
    level, stop. What is measured so far is saved after each system (``args.save``), so a
    call cut short by the device's time limit still returns it."""
    keys = args.systems
    ports = {"worker": devstack.free_port(), "router": devstack.free_port()}
    launcher = Launcher(
        log_dir,
        "",
        resolved,
        (*worker_flags(overrides), "--metrics-port", str(ports["worker"])),
        ("--metrics-port", str(ports["router"])),
        client_procs=0,
        start_timeout_s=900,
    )
    starts: dict[str, Callable[[], System]] = {
        "a": launcher.ours,
        "c": launcher.vllm_openai,
        "d": launcher.direct,
    }
    rows: list[dict[str, Any]] = []
    start_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    measured: dict[str, Any] = {
        "rows": rows,
        "errors": errors,
        "profiles": {},
        "client_check": [],
    }
    check_clients = "clients" in keys
    for key in (k for k in keys if k in starts):
        started = time.monotonic()
        system = starts[key]()
        try:
            system.wait()
            start_s[key] = _since(started)
            _warm(system, levels)
            for c, n in sorted(levels.items()):
                for turn in range(args.rounds):
                    rows.append(_measure(system, key, c, n, turn, ports))
            if key == "a" and len(levels) > 1:
                measured["profiles"] = measure.profile(system, out, max(levels))
            if key == "a" and check_clients:
                widest = max(levels)
                measured["client_check"] = measure.client_check(system, widest, levels[widest])
        except Exception as exc:  # the other systems still run; the error is reported
            _failed(errors, f"system {key}", key, exc)
        finally:
            system.stop()
        args.save(_document(resolved, overrides, levels, start_s, measured))
    document = _document(resolved, overrides, levels, start_s, measured)
    if check_clients:
        widest = max(levels)
        bare_rows = _guarded(
            errors, "bare", lambda: measure.bare_ceiling(log_dir, widest, levels[widest])
        )
        document["bare_ceiling"] = bare_rows
    return document


def _measure(
    system: System, key: str, c: int, n: int, turn: int, ports: dict[str, int]
) -> dict[str, Any]:
    """One run of ``n`` requests at concurrency ``c`` (round ``turn``; a new seed each)."""
    before = measure.latency_parts(ports) if key == "a" else {}
    prompts = make_prompts(n, c + 1000 * turn)
    document, usage, wall = system.run(prompts, c, MAX_TOKENS, f"{key}{c}r{turn}")
    row: dict[str, Any] = summarise(key, "gpu", c, document, usage, wall)
    row["round"] = turn
    if before:
        row["latency_parts_ms"] = measure.latency_delta(before, measure.latency_parts(ports))
    elif "vllm_times_ms" in document:  # in-process AsyncLLM: vLLM's own request times
        row["latency_parts_ms"] = document["vllm_times_ms"]
    logger.info("(%s) c=%d round %d: %.0f tok/s", key, c, turn, row["tokens_per_s"])
    return row


def _document(
    resolved: ResolvedProfile,
    overrides: Overrides,
    levels: dict[int, int],
    start_s: dict[str, float],
    measured: dict[str, Any],
) -> dict[str, Any]:
    """The phase's result: its set-up and what was ``measured`` (rows, errors, profiles,
    client check) so far."""
    return {
        "engine_args": dict(resolved.engine_args),
        "engine_env": dict(resolved.env),
        "worker_flags": worker_flags(overrides),
        "levels": levels,
        "max_tokens": MAX_TOKENS,
        "start_s": start_s,
        "bare_ceiling": [],
        **measured,
    }


def _warm(system: System, levels: dict[int, int]) -> None:
    """One wave at every level, widest first: first-call costs stay out of the figures.

    vLLM 0.23's Triton kernels compile (and autotune) per new batch shape: a wave at a
    level not warmed stalled for seconds on whichever system met that shape first
    (direct AsyncLLM at 64 in run A, our path at 64 in run B).
    """
    for c in sorted(levels, reverse=True):
        system.run(make_prompts(c, 999 - c), c, MAX_TOKENS, f"warm{c}")


def _guarded(errors: dict[str, str], key: str, step: Callable[[], Any]) -> Any:
    """``step()``; an exception is logged and reported under ``key`` (the run goes on)."""
    try:
        return step()
    except Exception as exc:
        _failed(errors, key, key, exc)
        return []


def _failed(errors: dict[str, str], what: str, key: str, exc: Exception) -> None:
    """Log ``what`` failed and report the error under ``key``."""
    logger.exception("%s failed", what)
    errors[key] = f"{type(exc).__name__}: {exc}"[:4000]


# ------------------------------------------------------------------ plumbing


def _levels(text: str | None, default: dict[int, int]) -> dict[int, int]:
    if not text:
        return dict(default)
    chosen = [int(c) for c in text.split(",")]
    return {c: default.get(c, max(4, c * 3)) for c in chosen}


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)


def _machine() -> dict[str, Any]:
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        gpu = "none"
    import vllm

    return {
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
    }


PHASES: dict[str, Callable[[Path, Path, argparse.Namespace], dict[str, Any]]] = {
    "e2e": e2e,
    "perf": perf,
    "real": real,
}


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.run", description=__doc__)
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument(
        "--systems",
        default="a,d,c,clients",
        help="a ours, d direct, c vLLM OpenAI; clients: our path from 1, 4 and 8 client processes",
    )
    parser.add_argument("--levels", help="concurrency levels, e.g. 1,64")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every level in a row (tables: the median)"
    )
    parser.add_argument("--tests", default="", help="e2e: a pytest -k expression")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--engine-profile", default=NVIDIA, help="cpu-tiny: a smoke run here")
    args = parser.parse_args(argv)
    global PROFILE
    PROFILE = args.engine_profile
    args.systems = args.systems.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(os.environ.get("OUT", "/tmp/qs-gpu/out"))
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix=f"qs-gpu-{args.phase}-"))
    name = args.phase + (f"-{args.tag}" if args.tag else "")
    started = time.monotonic()

    def save(partial: dict[str, Any]) -> None:
        partial.update(machine=_machine(), phase=args.phase, wall_s=_since(started), partial=True)
        (out / f"{name}.json").write_text(json.dumps(partial, indent=1) + "\n")

    args.save = save
    try:
        result = PHASES[args.phase](out, log_dir, args)
    finally:
        with tarfile.open(out / f"{name}-logs.tar.xz", "w:xz") as archive:
            archive.add(log_dir, arcname=name)
    result.update(machine=_machine(), phase=args.phase, wall_s=_since(started), partial=False)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.info("wrote %s", out / f"{name}.json")


if __name__ == "__main__":
    main()
