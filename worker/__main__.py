"""``python -m worker``: run one worker (one vLLM engine) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from qwen_serve import aio
from qwen_serve.queue.broker import worker_queue
from qwen_serve.settings import WorkerSettings, add_queue_flags
from worker import observability

logger = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> WorkerSettings:
    """Settings from flags over environment (QS_*, REDIS_URL)."""
    parser = argparse.ArgumentParser(prog="qwen-serve-worker", description=__doc__)
    add_queue_flags(parser)
    parser.add_argument("--profile", help="engine profile: cpu-tiny (default) or rocm-tp4")
    parser.add_argument("--model", help="model path or id (default: the profile's)")
    parser.add_argument("--served-model-name", help="name clients send in the model field")
    parser.add_argument("--capacity", type=int, help="requests run at once (max_num_seqs)")
    parser.add_argument("--max-model-len", type=int, help="context length")
    parser.add_argument("--mtp-tokens", type=int, help="MTP speculative tokens (0: off)")
    parser.add_argument("--kv-cache-gib", type=float, help="CPU KV cache size in GiB")
    parser.add_argument(
        "--structured-output-in-reasoning",
        action="store_const",
        const=True,
        help="constrain reasoning too (vLLM enable_in_reasoning; for tests, not production)",
    )
    parser.add_argument("--max-image-bytes", type=int, help="largest encoded image accepted")
    parser.add_argument("--max-image-pixels", type=int, help="largest image decoded (w x h)")
    parser.add_argument(
        "--image-url-host",
        action="append",
        dest="image_url_hosts",
        help="fetch http(s) image URLs of this host (repeatable; default: refuse remote URLs)",
    )
    parser.add_argument("--image-fetch-timeout-s", type=float, help="remote image time limit")
    parser.add_argument("--drain-grace-s", type=float, help="seconds to finish jobs on stop")
    parser.add_argument(
        "--coalesce-ms", type=float, help="least ms between reply writes (batching under load)"
    )
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return WorkerSettings(**args)


async def serve(settings: WorkerSettings) -> int:
    """Start the engine, claim jobs until SIGTERM, drain; return the exit code."""
    from worker import config_fix
    from worker.engine import Engine
    from worker.service import Worker

    engine = await Engine.start(settings)
    queue = worker_queue(settings, settings.worker_id, settings.claim_block_ms)
    worker = Worker(settings, engine, queue, capacity=engine.capacity)
    observability.watch(worker)
    worker.status.config_fix = config_fix.fix_status()
    logger.info("model card config fix: %s", worker.status.config_fix)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    try:
        await worker.run()
    finally:
        await queue.close()
        engine.shutdown()
    if worker.engine_dead:
        logger.error("engine died; exiting so the worker is restarted")
        return 1
    logger.info("worker %s stopped", settings.worker_id)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    settings = parse_args(argv)
    observability.setup(settings)
    logger.info("starting worker %s (profile %s)", settings.worker_id, settings.profile)
    sys.exit(aio.run(serve(settings)))


if __name__ == "__main__":
    main()
