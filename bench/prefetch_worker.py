"""PROTOTYPE (benchmarks only): a worker that claims jobs beyond its engine's max_num_seqs.

``python -m bench.prefetch_worker --prefetch N [worker flags]`` runs ``python -m worker``
with the claim budget raised by N: the extra jobs wait in vLLM's own scheduler, so a
finished sequence's slot is refilled in the engine's next step instead of after an
acknowledgement, a claim round trip and a render. ``python -m bench http --prefetch N``
measures it; the product worker claims at most max_num_seqs (one worker cannot hoard
jobs another, idle one could run).
"""

from __future__ import annotations

import sys
from typing import Any

from worker import __main__ as worker_main
from worker import service


def main(argv: list[str] | None = None) -> None:
    """``--prefetch N`` first, then the worker's own flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    prefetch = int(args[args.index("--prefetch") + 1])
    del args[args.index("--prefetch") : args.index("--prefetch") + 2]
    product = service.Worker

    class Prefetching(product):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, capacity: int, **kw: Any) -> None:
            super().__init__(*a, capacity=capacity + prefetch, **kw)

    service.Worker = Prefetching  # type: ignore[misc, assignment]
    worker_main.main(args)


if __name__ == "__main__":
    main()
