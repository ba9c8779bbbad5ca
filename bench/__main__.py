"""``python -m bench {engine,capacity,profile,before-after,http,render,all} [--quick]``: write docs.

``gpu-import DIR --run NAME`` stores a GPU run's results (``bench/gpu/README.md``).
``all`` runs engine, capacity and profile (about 14 minutes on 2 cores; ``--quick``
about 5); ``before-after --against REF`` (about 5 minutes) runs commit REF's router
and worker beside this checkout's (router path at 1,000 streams, time to first token
on the real engine); ``http`` (about 10 minutes) runs gRPC, our HTTP API (in the router
and beside it) and vLLM's OpenAI server side by side, plus ``vllm bench serve``;
``priority`` (about 4 minutes) each priority's first token under a flood of LOW requests;
``placement`` (about 10 minutes) prefix-cache hits of multi-turn chats on 1-3 workers;
``quotas`` (about 2 minutes) one tenant's in-flight cap shared by three routers;
``reserve`` (about 1 minute) full concurrency with and without a slot kept for HIGH.
Each benchmark saves its results to ``docs/benchmarks-data/<name>.json``; every
command then re-renders ``docs/benchmarks.md`` and the plots from whatever
results exist, so benchmarks can be re-run one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    before_after,
    capacity,
    engine_path,
    http_path,
    placement,
    priority,
    profile,
    quotas,
    render,
    reserve,
)
from bench.gpu import render as gpu_render

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DATA = DOCS / "benchmarks-data"


def save(name: str, result: dict[str, Any]) -> None:
    """Store one benchmark's results."""
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    meta = render.load(DATA, "meta")
    meta["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta.setdefault("load_avg", {})[name] = os.getloadavg()[0]
    (DATA / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = (
        "engine",
        "capacity",
        "profile",
        "before-after",
        "http",
        "priority",
        "placement",
        "quotas",
        "reserve",
        "render",
        "all",
        "gpu-import",
    )
    parser.add_argument("command", choices=commands)
    parser.add_argument("results", nargs="?", help="gpu-import: the GPU run's $OUT folder")
    parser.add_argument("--run", help="gpu-import: the run's name (e.g. its date and commit)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (a few minutes)")
    parser.add_argument("--smg-python", help="interpreter with smg-grpc-servicer for (b)")
    parser.add_argument(
        "--streams", type=int, default=1000, help="profile/before-after: concurrent streams"
    )
    parser.add_argument("--against", help="before-after: the earlier commit (any git ref)")
    parser.add_argument("--rounds", type=int, help="http: rounds of every level (default 2)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="http: run the prototype worker that claims N jobs beyond max_num_seqs",
    )
    args = parser.parse_args(argv)
    if args.command == "before-after" and not args.against:
        parser.error("before-after needs --against REF (the commit to compare with)")
    if args.command == "gpu-import" and not (args.results and args.run):
        parser.error("gpu-import needs the results folder and --run NAME")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command in ("engine", "all"):
        save("engine_path", engine_path.run(args.quick, args.smg_python))
    if args.command in ("capacity", "all"):
        save("capacity", capacity.run(args.quick))
    if args.command in ("profile", "all"):
        seconds = 5.0 if args.quick else 10.0
        save("profile", profile.run(args.streams, seconds, DATA))
    if args.command == "before-after":  # ~8 min more, so not part of "all"
        save("before_after", before_after.run(args.against, args.quick, args.streams))
    if args.command == "gpu-import":
        DATA.mkdir(parents=True, exist_ok=True)
        for path in gpu_render.import_run(Path(args.results), DATA, args.run):
            logger.info("stored %s", path)
    if args.command == "http":  # ~10 min more, so not part of "all"
        name = "http_path_prefetch" if args.prefetch else "http_path"
        save(name, http_path.run(args.quick, args.prefetch, args.rounds))
    if args.command == "priority":  # ~4 min, not part of "all"
        save("priority", priority.run(args.quick))
    if args.command == "placement":  # ~10 min, not part of "all"
        save("placement", placement.run(args.quick))
    if args.command == "quotas":  # ~2 min, not part of "all"
        save("quotas", quotas.run(args.quick))
    if args.command == "reserve":  # ~1 min, not part of "all"
        save("reserve", reserve.run(args.quick))
    out = render.render(DATA, DOCS)
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
