"""``python -m loadtest``: ghz's command line, run with grpc.aio."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from loadtest import multi, report
from loadtest.options import Options, OptionsError, parse_options
from loadtest.progress import Progress
from loadtest.reflect import resolve_at
from loadtest.runner import Runner
from qwen_serve import aio


async def run(options: Options, progress: Progress | None = None) -> dict[str, Any]:
    """Resolve the method by reflection, run the load and return the JSON report."""
    reflect_metadata = (
        options.metadata if options.reflect_metadata is None else options.reflect_metadata
    )
    method = await asyncio.to_thread(
        resolve_at,
        options.host,
        options.call,
        options.insecure,
        min(options.timeout_s or 10, 10),
        reflect_metadata,
    )
    if options.procs > 1:
        result = await asyncio.to_thread(multi.run_grpc_processes, options)
    else:
        result = await Runner(options, method, progress).run()
    return report.build(options, result)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (1 for a bad flag or an unreachable host)."""
    try:
        options = parse_options(argv)
    except OptionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    progress = None
    if options.progress and sys.stderr.isatty():
        progress = Progress(options.total, options.duration_s)
    try:
        document = aio.run(run(options, progress))
    except OptionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    text = report.render(document, options.format)
    if options.output:
        Path(options.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
