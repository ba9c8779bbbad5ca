"""Prefix-aware placement: prefix-cache hits and time to first token of multi-turn
conversations on 1, 2 and 3 workers, placement on and off (issue 17).

Each configuration is one real stack: redis-server, N workers with the CPU engine
(``cpu-tiny``, prefix caching on) and a router. The workload: ``conversations`` chats
of ``turns`` turns each, side by side; a turn sends the whole history (a system
prompt, the earlier questions and the model's answers) plus a new question. Measured
at the client: ``cached_tokens / prompt_tokens`` over every turn after the first
(``Usage``), and the time to first token. A skewed run then sends requests that all
start alike (one hot conversation prefix, so one key) and counts the requests each
worker ran (from the attempts' leases in Redis): the load bound must keep every
worker within 1.5x its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.tables import table
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import RouterQueue, connect
from qwen_serve.queue.codec import decode_lease
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import SharedSettings
from qwen_serve_dev import devstack
from qwen_serve_dev.devstack import Proc

logger = logging.getLogger(__name__)

PREFIX = "qs-bench-placement"
SYSTEM = (
    "You are the assistant of a support desk. Answer in short sentences, name the "
    "product the customer asks about, and end with one follow-up question."
)


@dataclass(frozen=True)
class Workload:
    """Conversation shape and the skewed run's size."""

    conversations: int = 16
    turns: int = 6
    answer_tokens: int = 16
    skewed_requests: int = 48
    skewed_concurrency: int = 12

    @classmethod
    def of(cls, quick: bool) -> Workload:
        """The full or the --quick workload."""
        return cls(conversations=8, turns=4, skewed_requests=24) if quick else cls()


def _turn(history: list[tuple[str, str]], tokens: int) -> pb.ChatRequest:
    request = pb.ChatRequest(
        enable_thinking=False,
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )
    request.messages.add(role=pb.ROLE_SYSTEM).content.add(text=SYSTEM)
    for question, answer in history:
        request.messages.add(role=pb.ROLE_USER).content.add(text=question)
        if answer:
            request.messages.add(role=pb.ROLE_ASSISTANT).content.add(text=answer)
    return request


async def _call(stub: Any, request: pb.ChatRequest) -> dict[str, Any]:
    """One chat: its request id, text, first-token latency and usage."""
    began, first, text, out = time.perf_counter(), 0.0, "", {}
    async for event in stub.Chat(request, timeout=600):
        kind = event.WhichOneof("event")
        if kind == "started":
            out["request_id"] = event.started.request_id
        elif kind == "delta":
            first = first or time.perf_counter() - began
            text += event.delta.content
        elif kind == "usage":
            out["prompt"], out["cached"] = event.usage.prompt_tokens, event.usage.cached_tokens
    return {**out, "text": text, "ttft_s": first}


def case_file(index: int, lines: int = 32) -> str:
    """A conversation's own long opening (a ticket's history): over one 640-token block of
    the hybrid model's prefix cache, so later turns can hit it."""
    return " ".join(
        f"Ticket {index}, entry {n}: order {index * 1000 + n} shipped from depot {n % 7}."
        for n in range(lines)
    )


async def _conversation(stub: Any, index: int, load: Workload) -> list[dict[str, Any]]:
    history: list[tuple[str, str]] = []
    results = []
    for turn in range(load.turns):
        question = f"Customer {index}, message {turn}: where is my order?"
        history.append((f"{case_file(index)}\n{question}" if turn == 0 else question, ""))
        result = await _call(stub, _turn(history, load.answer_tokens))
        history[-1] = (history[-1][0], result["text"])
        results.append({**result, "turn": turn})
    return results


async def _skewed(stub: Any, load: Workload) -> list[str]:
    """Requests that all start with the same conversation; their request ids."""
    gate = asyncio.Semaphore(load.skewed_concurrency)

    async def one(i: int) -> str:
        async with gate:
            history = [("The same opening question of every customer.", "Hello."), (f"{i}", "")]
            result = await _call(stub, _turn(history, load.answer_tokens))
            return str(result["request_id"])

    return list(await asyncio.gather(*(one(i) for i in range(load.skewed_requests))))


async def _sample_running(redis_url: str, stop: asyncio.Event) -> dict[str, int]:
    """Per worker: the sum of its heartbeats' running requests, read every 0.25 s
    until ``stop`` (its share of the load the fleet held, whatever its speed)."""
    queue = RouterQueue(
        connect(SharedSettings(redis_url=redis_url, key_prefix=PREFIX), 1000),
        Keys(PREFIX),
        "bench-sampler",
        5.0,
    )
    held: Counter[str] = Counter()
    try:
        while not stop.is_set():
            for status in await queue.live_workers():
                held[status.worker_id] += status.running
            await asyncio.sleep(0.25)
    finally:
        await queue.close()
    return dict(held)


async def _holders(redis_url: str, request_ids: list[str]) -> Counter[str]:
    client = connect(SharedSettings(redis_url=redis_url, key_prefix=PREFIX), 1000)
    try:
        raws: list[Any] = await client.mget([Keys(PREFIX).lease(r, 0) for r in request_ids])
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return Counter(decode_lease(raw).worker_id if raw else "?" for raw in raws)


async def _measure(target: str, redis_url: str, load: Workload, skew: bool) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        began = time.perf_counter()
        runs = [_conversation(stub, i, load) for i in range(load.conversations)]
        turns = [t for conv in await asyncio.gather(*runs) for t in conv]
        elapsed = time.perf_counter() - began
        later = [t for t in turns if t["turn"] > 0]
        out: dict[str, Any] = {
            "cached_ratio": sum(t["cached"] for t in later)
            / max(1, sum(t["prompt"] for t in later)),
            "ttft_p50_ms": statistics.median(t["ttft_s"] for t in turns) * 1000,
            "ttft_p90_ms": statistics.quantiles([t["ttft_s"] for t in turns], n=10)[-1] * 1000,
            "elapsed_s": elapsed,
            "per_worker": dict(await _holders(redis_url, [t["request_id"] for t in turns])),
        }
        if skew:
            sampling = asyncio.Event()
            sampler = asyncio.create_task(_sample_running(redis_url, sampling))
            ids = await _skewed(stub, load)
            sampling.set()
            out["skewed_running"] = await sampler
            out["skewed_per_worker"] = dict(await _holders(redis_url, ids))
    return out


def _start(log_dir: Path, workers: int, placement: bool) -> tuple[list[Proc], str, str]:
    redis, url = devstack.start_redis(log_dir)
    procs = [redis]
    for i in range(workers):
        procs.append(devstack.start_worker(url, log_dir, "--key-prefix", PREFIX, name=f"w{i}"))
    port = devstack.free_port()
    flag = "--placement" if placement else "--no-placement"
    procs.append(
        devstack.start_router(url, port, log_dir, "--key-prefix", PREFIX, flag, name="router")
    )
    target = f"127.0.0.1:{port}"
    devstack.wait_serving(target, procs)
    return procs, target, url


async def _await_workers(redis_url: str, count: int, timeout: float = 300) -> None:
    client = connect(SharedSettings(redis_url=redis_url, key_prefix=PREFIX), 1000)
    deadline = time.monotonic() + timeout
    try:
        while await client.zcard(Keys(PREFIX).workers) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} workers came up")
            await asyncio.sleep(1)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def run_config(workers: int, placement: bool, load: Workload) -> dict[str, Any]:
    """One stack: the conversations (and, with placement on, the skewed run)."""
    label = (
        f"{workers} worker{'s' if workers > 1 else ''}, placement {'on' if placement else 'off'}"
    )
    with tempfile.TemporaryDirectory(prefix="qs-bench-placement-") as tmp:
        procs, target, url = _start(Path(tmp), workers, placement)
        try:
            asyncio.run(_await_workers(url, workers))
            time.sleep(3)  # every router refresh has seen every worker
            logger.info("placement: %s: measuring", label)
            skew = placement and workers > 1
            result = asyncio.run(_measure(target, url, load, skew))
        finally:
            for proc in reversed(procs):
                proc.stop()
    return {"label": label, "workers": workers, "placement": placement, **result}


def run(quick: bool) -> dict[str, Any]:
    """Every configuration; the results ``python -m bench render`` tabulates."""
    load = Workload.of(quick)
    configs = [(1, True), (2, False), (2, True), (3, False), (3, True)]
    return {"workload": asdict(load), "configs": [run_config(n, p, load) for n, p in configs]}


def _busiest(values: list[int], workers: int) -> float:
    """The largest value over an even share of the total (0 without data)."""
    total = sum(values)
    return max(values) / (total / workers) if total else 0.0


def section(data: dict[str, Any]) -> list[str]:
    """The placement section of docs/benchmarks.md."""
    if not data:
        return ["Not measured yet: `python -m bench placement`."]
    load, configs = data["workload"], data["configs"]
    single = next((c for c in configs if c["workers"] == 1), None)
    lines = [
        f"`python -m bench placement` (about 10 minutes): {load['conversations']} "
        f"conversations of {load['turns']} turns side by side, each turn the whole history "
        f"plus a question ({load['answer_tokens']}-token answers), through one router to "
        "1, 2 or 3 `cpu-tiny` workers (prefix caching on); each conversation opens with its "
        "own ~1,100-token ticket history. Cached share: `cached_tokens / "
        "prompt_tokens` of every turn after the first; goals: placement keeps 90% of one "
        "worker's cached share, with a lower TTFT p50 than the shared stream alone.",
        "",
    ]
    rows = []
    for c in configs:
        versus = (
            f"{c['cached_ratio'] / single['cached_ratio']:.2f}"
            if single and single["cached_ratio"]
            else "-"
        )
        spread = ", ".join(str(n) for n in sorted(c["per_worker"].values(), reverse=True))
        rows.append(
            (
                c["label"],
                f"{c['cached_ratio']:.1%}",
                versus,
                f"{c['ttft_p50_ms']:.0f}",
                f"{c['ttft_p90_ms']:.0f}",
                spread,
            )
        )
    header = (
        "configuration",
        "cached share",
        "vs 1 worker",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "turns per worker",
    )
    lines += [*table(header, rows), ""]
    skewed = [c for c in configs if "skewed_per_worker" in c]
    if skewed:
        lines += [
            f"Skewed run ({load['skewed_requests']} requests with the same leading messages, "
            f"{load['skewed_concurrency']} at a time; goal: no worker above 1.5x its share):",
            "",
        ]
        skew_rows = []
        for c in skewed:
            counts = sorted(c["skewed_per_worker"].values(), reverse=True)
            held = sorted(c.get("skewed_running", {}).values(), reverse=True) or [0]
            skew_rows.append(
                (
                    c["label"],
                    ", ".join(map(str, counts)),
                    f"{_busiest(counts, c['workers']):.2f}x",
                    f"{_busiest(held, c['workers']):.2f}x",
                )
            )
        skew_header = (
            "configuration",
            "requests per worker",
            "busiest / share",
            "load held: busiest / share",
        )
        lines += [*table(skew_header, skew_rows), ""]
        lines += [
            "*Requests* count what each worker finished: on this 2-core machine the engines run "
            "at unequal speeds (vLLM binds every CPU engine's model runner to core 0; see the "
            "shared stream's own split above), so a faster worker finishes more of the same "
            "load. *Load held* sums each worker's running requests from its heartbeats, "
            "sampled every 0.25 s during the run: the share the placement bound governs.",
            "",
        ]
    return lines
