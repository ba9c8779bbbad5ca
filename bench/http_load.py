"""(c)'s client: the same prompts, streamed from vLLM's OpenAI server (``/v1/completions``).

``python -m bench.http_load --url http://127.0.0.1:P -D prompts.json -c 8 -n 32 -o out.json``
sends each prompt (token ids) with ``stream: true`` and ``return_token_ids: true``
and writes the same report as ``python -m loadtest -O json`` (a chunk carries
``len(token_ids)`` tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest import multi, report
from loadtest.options import Options
from loadtest.runner import CallResult, RunResult
from qwen_serve import aio

PATH = "/v1/completions"


def _on_chunk(result: CallResult, start: int, chunk: dict[str, Any]) -> None:
    now = time.monotonic_ns()
    result.messages += 1
    choices = chunk.get("choices") or []
    tokens = sum(len(c.get("token_ids") or []) for c in choices)
    if not tokens:
        return
    result.add_tokens(tokens, now, start)


async def _call(client: httpx.AsyncClient, body: dict[str, Any]) -> CallResult:
    result = CallResult(start_unix_ns=time.time_ns())
    start = time.monotonic_ns()
    try:
        async with client.stream("POST", PATH, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                result.status, result.error = "Unknown", f"HTTP {response.status_code}: {text}"
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        _on_chunk(result, start, json.loads(line[6:]))
    except httpx.HTTPError as exc:
        result.status, result.error = "Unavailable", f"{type(exc).__name__}: {exc}"
    result.latency_ns = time.monotonic_ns() - start
    return result


async def run(url: str, bodies: list[dict[str, Any]], concurrency: int, total: int) -> RunResult:
    """``total`` streamed completions with ``concurrency`` workers."""
    issued = itertools.count()
    results: list[CallResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300, trust_env=False) as c:

        async def worker() -> None:
            while (i := next(issued)) < total:
                results.append(await _call(c, bodies[i % len(bodies)]))

        started = time.monotonic_ns()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        return RunResult(results, time.monotonic_ns() - started)


@dataclass(frozen=True)
class Share:
    """One client process's part of the load."""

    url: str
    bodies: list[dict[str, Any]]
    concurrency: int
    total: int


def prepare(part: Share) -> Callable[[], Awaitable[RunResult]]:
    """A child process's load (``loadtest.multi``)."""
    return functools.partial(run, part.url, part.bodies, part.concurrency, part.total)


def run_split(url: str, bodies: list[dict[str, Any]], c: int, total: int, procs: int) -> RunResult:
    """The load over ``procs`` processes (one is not enough past a few thousand chunks/s)."""
    if procs <= 1:
        return aio.run(run(url, bodies, c, total))
    shares = [
        Share(url, bodies, max(1, multi.split(c, i, procs)), multi.split(total, i, procs))
        for i in range(procs)
    ]
    return multi.run_processes(prepare, [s for s in shares if s.total])


def completion_body(model: str, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """The /v1/completions request of one benchmark prompt (greedy, fixed length)."""
    return {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_load", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("-D", "--data-file", required=True, help="JSON array of request bodies")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--total", type=int, default=1)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--procs", type=int, default=1, help="client processes sharing the load")
    args = parser.parse_args(argv)
    bodies = json.loads(Path(args.data_file).read_text())
    result = run_split(args.url, bodies, args.concurrency, args.total, args.procs)
    options = Options(
        host=args.url,
        call=f"POST {PATH}",
        data=bodies[:1],
        concurrency=args.concurrency,
        total=args.total,
        insecure=True,
    )
    Path(args.output).write_text(json.dumps(report.build(options, result)))


if __name__ == "__main__":
    main()
