"""``python -m router``: run one router."""

from __future__ import annotations

import argparse
import asyncio
import logging

from qwen_serve.settings import RouterSettings
from qwen_serve.telemetry import setup_logging


def parse_args(argv: list[str] | None = None) -> RouterSettings:
    """Settings from flags over environment (QS_*, REDIS_URL)."""
    parser = argparse.ArgumentParser(prog="qwen-serve-router", description=__doc__)
    parser.add_argument("--listen", help="gRPC address, e.g. [::]:50051")
    parser.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
    parser.add_argument("--key-prefix", help="prefix of every Redis key")
    parser.add_argument("--max-inflight", type=int, help="streams at once before refusing")
    parser.add_argument(
        "--max-inflight-per-tenant", type=int, help="streams of one tenant before refusing"
    )
    parser.add_argument("--max-queue-depth", type=int, help="queued jobs before refusing")
    parser.add_argument("--drain-grace-s", type=float, help="seconds to finish streams on stop")
    parser.add_argument("--max-message-bytes", type=int, help="largest request accepted")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return RouterSettings(**args)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    settings = parse_args(argv)
    setup_logging()
    logging.getLogger(__name__).info("starting router %s", settings.router_id)
    try:
        import uvloop

        uvloop.run(_serve(settings))
    except ImportError:
        asyncio.run(_serve(settings))


async def _serve(settings: RouterSettings) -> None:
    from router.server import serve

    await serve(settings)


if __name__ == "__main__":
    main()
