"""``python -m router``: run one router."""

from __future__ import annotations

import argparse
import logging

from qwen_serve import aio
from qwen_serve.flags import add_settings_flags, settings_from_args
from qwen_serve.settings import RouterSettings
from router import observability


def parse_args(argv: list[str] | None = None) -> RouterSettings:
    """Settings from flags over environment (QS_*, REDIS_URL)."""
    parser = argparse.ArgumentParser(prog="qwen-serve-router", description=__doc__)
    add_settings_flags(parser, RouterSettings)
    return settings_from_args(RouterSettings, parser.parse_args(argv), parser)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    settings = parse_args(argv)
    observability.setup(settings)
    logging.getLogger(__name__).info("starting router %s", settings.router_id)
    aio.freeze_heap()
    aio.run(_serve(settings))


async def _serve(settings: RouterSettings) -> None:
    from router.server import serve

    await serve(settings)


if __name__ == "__main__":
    main()
