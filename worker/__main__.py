"""``python -m worker``: run one worker (one vLLM engine) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from qwen_serve import aio
from qwen_serve.flags import add_settings_flags, settings_from_args
from qwen_serve.queue.broker import worker_queue
from qwen_serve.settings import WorkerSettings
from worker import observability

logger = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> WorkerSettings:
    """Settings from flags over environment (QS_*, REDIS_URL)."""
    parser = argparse.ArgumentParser(prog="qwen-serve-worker", description=__doc__)
    add_settings_flags(
        parser,
        WorkerSettings,
        skip=("engine_args",),
        flag_names={"image_url_hosts": "--image-url-host"},
        aliases={"capacity": ["--max-num-seqs"]},
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further vLLM AsyncEngineArgs field, applied last (repeatable; VALUE is "
        "JSON or a plain string, e.g. gdn_prefill_backend=triton); merged over "
        "QS_ENGINE_ARGS, a JSON object",
    )
    args = parser.parse_args(argv)
    try:
        flagged = engine_arg_pairs(args.engine_arg)
    except ValueError as exc:
        parser.error(str(exc))
    settings = settings_from_args(WorkerSettings, args, parser)
    if flagged:
        settings.engine_args = {**settings.engine_args, **flagged}
    return settings


def engine_arg_pairs(pairs: list[str]) -> dict[str, Any]:
    """``--engine-arg KEY=VALUE`` items as a dict; VALUE parsed as JSON when it is JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--engine-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


async def serve(settings: WorkerSettings) -> int:
    """Start the engine, claim jobs until SIGTERM, drain; return the exit code."""
    from worker import config_fix
    from worker.engine import Engine
    from worker.service import Worker

    try:
        engine = await Engine.start(settings)
    except ValueError as exc:  # a bad profile or engine setting (vb.EngineArgError among them)
        logger.error("cannot start the engine: %s", exc)
        return 2
    queue = worker_queue(settings, settings.worker_id, settings.claim_block_ms)
    worker = Worker(settings, engine, queue, capacity=engine.capacity)
    observability.watch(worker)
    worker.status.config_fix = config_fix.fix_status()
    logger.info("model card config fix: %s", worker.status.config_fix)
    aio.freeze_heap()  # vLLM, torch and the tokenizer: ~700,000 objects no collection walks
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
