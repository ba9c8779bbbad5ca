"""``python -m router``: run one router."""

from __future__ import annotations

import argparse
import gc
import logging

from qwen_serve import aio
from qwen_serve.settings import RouterSettings, add_queue_flags
from router import observability


def parse_args(argv: list[str] | None = None) -> RouterSettings:
    """Settings from flags over environment (QS_*, REDIS_URL)."""
    parser = argparse.ArgumentParser(prog="qwen-serve-router", description=__doc__)
    add_queue_flags(parser)
    parser.add_argument("--listen", help="gRPC address, e.g. [::]:50051")
    parser.add_argument("--max-inflight", type=int, help="streams at once before refusing")
    parser.add_argument(
        "--max-inflight-per-tenant", type=int, help="streams of one tenant before refusing"
    )
    parser.add_argument("--max-queue-depth", type=int, help="queued jobs before refusing")
    parser.add_argument("--drain-grace-s", type=float, help="seconds to finish streams on stop")
    parser.add_argument("--max-message-bytes", type=int, help="largest request accepted")
    parser.add_argument("--tls-cert-file", help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key-file", help="key of --tls-cert-file (PEM)")
    parser.add_argument("--tls-client-ca-file", help="CA of client certificates (mutual TLS)")
    parser.add_argument("--api-keys-file", help="'tenant:key' lines; every call needs a key")
    parser.add_argument(
        "--auth-health", action="store_const", const=True, help="API key for health/reflection too"
    )
    parser.add_argument("--health-listen", help="plaintext health-only address (probes)")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return RouterSettings(**args)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    settings = parse_args(argv)
    observability.setup(settings)
    logging.getLogger(__name__).info("starting router %s", settings.router_id)
    tune_gc()
    aio.run(_serve(settings))


def tune_gc() -> None:
    """Fewer garbage collections on the event path.

    Relaying a token allocates several short-lived protobuf and asyncio objects,
    so CPython's default young-generation threshold (700) collects many times a
    second under load. The objects made at start-up (modules, settings) are
    frozen out of every collection. Measured in docs/benchmarks.md.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _serve(settings: RouterSettings) -> None:
    from router.server import serve

    await serve(settings)


if __name__ == "__main__":
    main()
