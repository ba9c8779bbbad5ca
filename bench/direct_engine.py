"""(d), the floor: the same prompts through ``AsyncLLM.generate`` in-process, no server.

``python -m bench.direct_engine`` starts ``AsyncLLM`` with the cpu-tiny engine
arguments (``bench.stack.engine_profile``), prints ``BENCH ready`` and then serves
commands on stdin, one JSON object a line:
``{"prompts": [[ids...], ...], "max_tokens": 64, "concurrency": 8, "total": 32}``.
For each it writes one line to stdout, ``BENCH `` and the ``python -m loadtest -O json`` report
of that run (time to first token from the ``generate`` call to the first output
with tokens).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.options import Options
from loadtest.runner import CallResult, RunResult

logger = logging.getLogger(__name__)

MARK = "BENCH "
"""Prefix of protocol lines on stdout (vLLM logs to stdout too)."""


async def _call(llm: Any, prompt: list[int], params: Any, request_id: str) -> CallResult:
    from vllm.inputs import TokensPrompt

    result = CallResult(start_unix_ns=time.time_ns())
    start = time.monotonic_ns()
    try:
        async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id):
            now = time.monotonic_ns()
            result.messages += 1
            tokens = sum(len(o.token_ids) for o in output.outputs)
            if not tokens:
                continue
            result.add_tokens(tokens, now, start)
    except Exception as exc:  # the report counts it; the process stays up
        result.status, result.error = "Internal", f"{type(exc).__name__}: {exc}"
    result.latency_ns = time.monotonic_ns() - start
    return result


async def run_command(llm: Any, command: dict[str, Any], run_id: int) -> dict[str, Any]:
    """Run one command's load and return its report."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=command["max_tokens"],
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    prompts: list[list[int]] = command["prompts"]
    total, concurrency = command["total"], command["concurrency"]
    issued = itertools.count()
    results: list[CallResult] = []

    async def worker() -> None:
        while (i := next(issued)) < total:
            rid = f"direct-{run_id}-{i}"
            results.append(await _call(llm, prompts[i % len(prompts)], params, rid))

    before = vllm_times()
    started = time.monotonic_ns()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    run = RunResult(results, time.monotonic_ns() - started)
    options = Options(host="in-process", call="AsyncLLM.generate", total=total)
    document = report.build(options, run)
    document["vllm_times_ms"] = times_delta(before, vllm_times())
    return document


VLLM_TIMES = {
    "engine_queue": "vllm:request_queue_time_seconds",
    "engine_prefill": "vllm:request_prefill_time_seconds",
}
"""vLLM's own request times (its Prometheus histograms, in this process's registry): waiting
in the scheduler, and from the first scheduled step to the first token."""


def vllm_times() -> dict[str, tuple[float, float]]:
    """(sum, count) of each of ``VLLM_TIMES`` now."""
    from prometheus_client import REGISTRY

    totals = {name: (0.0, 0.0) for name in VLLM_TIMES}
    metrics = {metric: name for name, metric in VLLM_TIMES.items()}
    for family in REGISTRY.collect():
        name = metrics.get(family.name)
        if name is None:
            continue
        total, count = totals[name]
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
        totals[name] = (total, count)
    return totals


def times_delta(
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
    scales: dict[str, float] | None = None,
) -> dict[str, float]:
    """Each histogram's mean over what it observed in between: (sum, count) pairs, the
    means in milliseconds unless ``scales`` gives a name another factor (1: counts)."""
    means = {}
    for name, (total, count) in after.items():
        n = count - before[name][1]
        scale = (scales or {}).get(name, 1000.0)
        means[name] = round((total - before[name][0]) * scale / n, 2) if n else 0.0
    return means


async def serve(config: dict[str, Any] | None = None) -> None:
    """Start the engine, then answer commands from stdin until it closes.

    ``config`` holds ``engine_args`` (``AsyncEngineArgs`` keywords) and ``env``; by
    default the cpu-tiny profile's (``bench.stack.engine_profile``).
    """
    from bench.stack import engine_profile
    from worker import vllm_boundary

    if config is None:
        resolved = engine_profile()
        config = {"engine_args": dict(resolved.engine_args), "env": dict(resolved.env)}
    os.environ.update(config["env"])
    llm = vllm_boundary.start_engine(config["engine_args"], ())
    loop = asyncio.get_running_loop()
    print(MARK + "ready", flush=True)
    try:
        for run_id in itertools.count():
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                break
            document = await run_command(llm, json.loads(line), run_id)
            print(MARK + json.dumps(document), flush=True)
    finally:
        llm.shutdown()


def main() -> None:
    """Entry point (the engine spawns processes: keep the main guard).

    An argument names a JSON file with ``engine_args`` and ``env`` (``bench.gpu``).
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else None
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
