"""Bench-only prototypes of the proposed hot-path changes, to measure them before they land.

Nothing here changes the product: ``python -m bench.experiments --patch gc,batch --
<router flags>`` runs the unchanged router with monkeypatches applied in its own
process, and ``bench.sim_worker --batch-replies`` writes replies the way the
``batch`` patch reads them. ``python -m bench experiments`` compares each variant
with the unpatched router at 1,000 streams (docs/benchmarks.md, "Before/after").

Patches (each mirrors a change proposed in docs/benchmarks.md):

``merge``
    Now a no-op: the router merges a Delta into the previous waiting Delta of its
    choice since this prototype landed (``qwen_serve.deltas.EventQueue``).
``gc``
    ``gc.freeze()`` after start-up and a young-generation threshold of 50,000
    allocations instead of 700 (the event path allocates many short-lived protos).
``batch``
    One reply-stream entry per reply stream per worker flush, carrying every Reply
    of that flush in numbered fields (``m0``, ``m1``, ...), instead of one entry per
    request: fewer XADDs for the worker, fewer entries for the router to parse.

Worker patches (``--target worker``), for time to first token on the real engine:

``first-flush``
    ``ReplyWriter`` writes a flush holding a Started event at once instead of
    after the coalescing window.
``started-async``
    ``WorkerQueue.mark_started`` runs in the background instead of delaying the
    Started event by a Redis round trip.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qwen_serve.queue import broker
from qwen_serve.queue.codec import FIELD, Reply, decode

logger = logging.getLogger(__name__)

BATCH_FIELD = b"m%d"


def patch_merge() -> None:
    """Merge queued deltas per request in the router's channel.

    Landed in the product (``qwen_serve.deltas.EventQueue``); kept as a no-op so
    older experiment command lines still run.
    """
    logger.info("merge: already part of the router (qwen_serve.deltas.EventQueue)")


def patch_gc() -> None:
    """Fewer young-generation collections; start-up objects frozen out of them."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def batched_fields(replies: Sequence[Reply]) -> dict[bytes, bytes]:
    """One stream entry holding several replies."""
    return {BATCH_FIELD % i: r.SerializeToString() for i, r in enumerate(replies)}


def unbatch(fields: dict[bytes, bytes]) -> list[Reply | None]:
    """The replies of an entry written by :func:`batched_fields` (or a plain one)."""
    if FIELD in fields:
        return [broker._decode_or_none(Reply, fields)]
    out: list[Reply | None] = []
    for i in range(len(fields)):
        raw = fields.get(BATCH_FIELD % i)
        out.append(decode(Reply, raw) if raw is not None else None)
    return out


def patch_batch_read() -> None:
    """The router reads entries of several replies."""

    async def read_replies(
        self: broker.RouterQueue, last_id: bytes, block_ms: int, count: int = 512
    ) -> list[tuple[bytes, Reply | None]]:
        with broker._redis_errors():
            found: Any = await self.redis.xread(
                {self.reply_stream: last_id}, count=count, block=block_ms
            )
        return [
            (entry_id, reply)
            for _stream, entries in found or []
            for entry_id, fields in entries
            for reply in unbatch(fields)
        ]

    broker.RouterQueue.read_replies = read_replies  # type: ignore[method-assign]


async def send_batched(queue: broker.WorkerQueue, replies: Sequence[tuple[str, Reply]]) -> None:
    """The worker side of ``batch``: one XADD per reply stream."""
    by_stream: dict[str, list[Reply]] = {}
    for stream, reply in replies:
        by_stream.setdefault(stream, []).append(reply)
    with broker._redis_errors():
        async with queue.redis.pipeline(transaction=False) as pipe:
            for stream, batch in by_stream.items():
                pipe.xadd(
                    stream,
                    batched_fields(batch),  # type: ignore[arg-type]
                    maxlen=broker.REPLY_STREAM_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()


def patch_tracemalloc() -> None:
    """Trace Python allocations; SIGUSR1 writes the top sites to $QS_BENCH_TRACEMALLOC_OUT."""
    import os
    import signal
    import tracemalloc

    tracemalloc.start(8)
    out = os.environ.get("QS_BENCH_TRACEMALLOC_OUT", "/tmp/qs-bench-tracemalloc.txt")

    def dump(_signum: int, _frame: object) -> None:
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("traceback")[:25]
        total = sum(s.size for s in snapshot.statistics("filename"))
        lines = [f"total traced: {total / 2**20:.1f} MiB"]
        for stat in stats:
            lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d} blocks")
            lines += [f"      {frame}" for frame in stat.traceback.format()[-6:]]
        with open(out, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    signal.signal(signal.SIGUSR1, dump)


def patch_first_flush() -> None:
    """No coalescing window before a flush that carries a Started event."""
    import asyncio

    from worker import replies

    original_put = replies.ReplyWriter.put

    def put(self: Any, request_id: str, stream: str, event: Any) -> None:
        if event.HasField("started"):
            self._urgent = True
        original_put(self, request_id, stream, event)

    async def run(self: Any) -> None:
        while True:
            await self._wake.wait()
            if self.window_s and not getattr(self, "_urgent", False):
                await asyncio.sleep(self.window_s)
            self._urgent = False
            self._wake.clear()
            batch, self._buffer = self._buffer, {}
            await self._send(batch)
            if not self._buffer:
                self._idle.set()

    replies.ReplyWriter.put = put  # type: ignore[method-assign]
    replies.ReplyWriter.run = run  # type: ignore[method-assign]


def patch_started_async() -> None:
    """The started marker is written in the background."""
    import asyncio

    original = broker.WorkerQueue.mark_started
    pending: set[asyncio.Task[None]] = set()

    async def mark_started(self: broker.WorkerQueue, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(original(self, request_id))
        pending.add(task)
        task.add_done_callback(pending.discard)

    broker.WorkerQueue.mark_started = mark_started  # type: ignore[method-assign]


WORKER_PATCHES: dict[str, Callable[[], None]] = {
    "first-flush": patch_first_flush,
    "started-async": patch_started_async,
}

ROUTER_PATCHES: dict[str, Callable[[], None]] = {
    "merge": patch_merge,
    "gc": patch_gc,
    "batch": patch_batch_read,
    "tracemalloc": patch_tracemalloc,
}


def main(argv: list[str] | None = None) -> None:
    """Run the router (or worker) with patches: ``[--target worker] --patch a,b -- <flags>``."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("--target", choices=("router", "worker"), default="router")
    parser.add_argument("--patch", default="", help=",".join([*ROUTER_PATCHES, *WORKER_PATCHES]))
    args = parser.parse_args(argv[:split])
    patches = ROUTER_PATCHES if args.target == "router" else WORKER_PATCHES
    names = [n for n in args.patch.split(",") if n]
    for name in names:
        patches[name]()
    logging.getLogger(__name__).info("%s with bench patches %s", args.target, names)
    if args.target == "worker":
        from worker.__main__ import main as worker_main

        worker_main(argv[split + 1 :])
    else:
        from router.__main__ import main as router_main

        router_main(argv[split + 1 :])


if __name__ == "__main__":
    main()
