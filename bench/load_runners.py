"""How a benchmark drives each system with a load: one runner per kind of server.

A runner takes ``(prompts, concurrency, max_tokens, tag)``, runs the load in client
processes of its own (``python -m loadtest`` for gRPC, ``bench.http_load`` for
HTTP) or through the ``bench.direct_engine`` process, and returns the client's
JSON report. Used by the engine-path, HTTP-path and before/after benchmarks.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import stack
from bench.http_load import completion_body
from qwen_serve_dev import devstack

Runner = Callable[[list[list[int]], int, int, str], dict[str, Any]]
"""Runs ``(prompts, concurrency, max_tokens, tag)``; the client's report."""


def _loadgen(
    target: str, call: str, bodies: list[dict[str, Any]], c: int, work: Path, procs: int = 1
) -> Any:
    data, out = work / "data.json", work / "report.json"
    data.write_text(json.dumps(bodies))
    args = [
        *devstack.python_module("loadtest", "--insecure", "--call", call, "-D", str(data)),
        *("-c", str(c), "-n", str(len(bodies)), "-t", "600s", "-O", "json", "-o", str(out)),
        *("--procs", str(procs), "--connections", str(max(1, c // 64))),
        *("--no-progress", target),
    ]
    subprocess.run(stack.client_command(args), check=True, env=stack.bench_env())
    return json.loads(out.read_text())


def client_procs(c: int) -> int:
    """Client processes for ``c`` streams: one per 64 (one Python client tops out first)."""
    return max(1, min(8, c // 64))


def ours_runner(target: str, work: Path, procs: int = 1) -> Callable[..., dict[str, Any]]:
    """(a): qwen_serve.api.v1.Inference/Generate with token ids (``procs``: 0 scales with c)."""

    def run(prompts: list[list[int]], c: int, max_tokens: int, tag: str) -> dict[str, Any]:
        sampling = {"maxTokens": max_tokens, "temperature": 0, "ignoreEos": True}
        bodies = [{"tokenIds": {"ids": p}, "sampling": sampling} for p in prompts]
        call = "qwen_serve.api.v1.Inference/Generate"
        return _loadgen(target, call, bodies, c, work, procs or client_procs(c))  # type: ignore[no-any-return]

    return run


def vllm_grpc_runner(target: str, work: Path) -> Callable[..., dict[str, Any]]:
    """(b): vllm.grpc.engine.VllmEngine/Generate with tokenized input."""

    def run(prompts: list[list[int]], c: int, max_tokens: int, tag: str) -> dict[str, Any]:
        sampling = {"maxTokens": max_tokens, "temperature": 0, "ignoreEos": True}
        bodies = [
            {
                "requestId": f"bench-{tag}-{i}",
                "tokenized": {"inputIds": p},
                "samplingParams": sampling,
                "stream": True,
            }
            for i, p in enumerate(prompts)
        ]
        return _loadgen(target, "vllm.grpc.engine.VllmEngine/Generate", bodies, c, work)  # type: ignore[no-any-return]

    return run


def openai_runner(
    base_url: str, model: str, work: Path, procs: int = 1
) -> Callable[..., dict[str, Any]]:
    """(c): /v1/completions streamed, through bench.http_load (``procs``: 0 scales with c)."""

    def run(prompts: list[list[int]], c: int, max_tokens: int, tag: str) -> dict[str, Any]:
        data, out = work / "http-data.json", work / "http-report.json"
        data.write_text(json.dumps([completion_body(model, p, max_tokens) for p in prompts]))
        args = devstack.python_module(
            "bench.http_load", "--url", base_url, "-D", str(data), "-c", str(c)
        )
        args += ["-n", str(len(prompts)), "-o", str(out)]
        args += ["--procs", str(procs or client_procs(c))]
        subprocess.run(stack.client_command(args), check=True, env=stack.bench_env())
        return json.loads(out.read_text())  # type: ignore[no-any-return]

    return run


def direct_runner(proc: subprocess.Popen[str]) -> Callable[..., dict[str, Any]]:
    """(d): a command to the bench.direct_engine process."""

    def run(prompts: list[list[int]], c: int, max_tokens: int, tag: str) -> dict[str, Any]:
        command = {"prompts": prompts, "max_tokens": max_tokens, "concurrency": c}
        command["total"] = len(prompts)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        return json.loads(read_marked(proc))  # type: ignore[no-any-return]

    return run


def read_marked(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("BENCH "):
            return line[6:]
    raise RuntimeError(f"bench.direct_engine exited ({proc.poll()})")
