"""ghz's command-line flags, parsed into :class:`Options`.

The flag names, short forms and defaults follow ghz (``-c 50``, ``-n 200``,
``-t 20s``, ``--connections 1``, ``-O summary``); ``--no-progress`` and
``--stamped-tokens`` are ours.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("summary", "json", "pretty")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class OptionsError(ValueError):
    """A flag value that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class Options:
    """One load test, as ghz would describe it."""

    host: str
    call: str
    data: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    """Request messages as JSON objects; calls take them round-robin (ghz's array data)."""
    metadata: dict[str, str] = field(default_factory=dict)
    reflect_metadata: dict[str, str] | None = None
    """Metadata of the reflection calls; None sends ``metadata``."""
    concurrency: int = 50
    total: int = 200
    rps: float = 0.0
    """Request starts per second over all workers; 0 is unlimited."""
    duration_s: float = 0.0
    """Run for this long (``-z``); when set, ``total`` is ignored."""
    timeout_s: float = 20.0
    connections: int = 1
    insecure: bool = False
    format: str = "summary"
    output: str | None = None
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    skip_first: int = 0
    progress: bool = True
    stamped_tokens: bool = False
    """Delta text carries emit timestamps (bench.sim_worker): report per-token delivery delay."""
    procs: int = 1
    """Client processes sharing the load (``--procs``; not a ghz flag)."""

    @property
    def method_path(self) -> str:
        """The call as a gRPC path, ``/package.Service/Method``."""
        return "/" + normalise_call(self.call)


def normalise_call(call: str) -> str:
    """``pkg.Service/Method`` from ghz's ``pkg.Service/Method`` or ``pkg.Service.Method``."""
    call = call.strip().lstrip("/")
    if "/" not in call:
        service, _, method = call.rpartition(".")
        call = f"{service}/{method}"
    service, _, method = call.partition("/")
    if not service or not method or "/" in method:
        raise OptionsError(f"--call: expected package.Service/Method, got {call!r}")
    return f"{service}/{method}"


def parse_duration(text: str, flag: str) -> float:
    """Seconds from a Go-style duration (``10s``, ``1m30s``, ``500ms``); a bare number is s."""
    text = text.strip()
    if not text:
        raise OptionsError(f"{flag}: empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise OptionsError(f"{flag}: not a duration: {text!r} (e.g. 10s, 1m, 500ms)")
    return total


def _json_arg(text: str, flag: str) -> Any:
    if text == "@":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionsError(f"{flag}: not JSON: {exc}") from exc


def _json_file(path: str, flag: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise OptionsError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise OptionsError(f"{flag}: {path} is not JSON: {exc}") from exc


def _data(value: Any, flag: str) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, dict) for item in items):
        raise OptionsError(f"{flag}: expected a JSON object or an array of objects")
    return items


def _string_map(value: Any, flag: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise OptionsError(f"{flag}: expected a JSON object of strings")
    return {str(k).lower(): str(v) for k, v in value.items()}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (ghz's flag names)."""
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="ghz-compatible gRPC load generator with streaming metrics",
    )
    p.add_argument("host", help="server address, host:port")
    p.add_argument("--call", required=True, help="package.Service/Method or package.Service.Method")
    p.add_argument("-d", "--data", help="request as JSON (object or array); '@' reads stdin")
    p.add_argument("-D", "--data-file", help="file with the request JSON")
    p.add_argument("-m", "--metadata", help="request metadata as a JSON object")
    p.add_argument("-M", "--metadata-file", help="file with the metadata JSON")
    p.add_argument("--reflect-metadata", help="metadata JSON for reflection (default: -m)")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="concurrent workers (50)")
    p.add_argument("-n", "--total", type=int, default=200, help="number of requests (200)")
    p.add_argument("-r", "--rps", type=float, default=0, help="request starts per second (0: any)")
    p.add_argument("-z", "--duration", default="0", help="run time, e.g. 30s; overrides -n")
    p.add_argument("-t", "--timeout", default="20s", help="per-call deadline (20s; 0: none)")
    p.add_argument("--connections", type=int, default=1, help="gRPC channels shared by workers")
    p.add_argument("--insecure", action="store_true", help="plaintext (no TLS)")
    p.add_argument("-O", "--format", default="summary", choices=FORMATS, help="report format")
    p.add_argument("-o", "--output", help="write the report to this file")
    p.add_argument("--name", default="", help="name of the run, kept in the report")
    p.add_argument("--tags", help="JSON object of tags kept in the report")
    p.add_argument("--skipFirst", type=int, default=0, help="leave the first N calls out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="client processes sharing -c/-n/--connections (one Python process tops out "
        "at a few tens of thousands of messages/s); reported as one run",
    )
    p.add_argument(
        "--stamped-tokens",
        action="store_true",
        help="delta text is emit timestamps (bench.sim_worker): report delivery delay",
    )
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    """Options from the command line; OptionsError names the flag at fault."""
    args = build_parser().parse_args(argv)
    data: list[dict[str, Any]] = [{}]
    if args.data is not None:
        data = _data(_json_arg(args.data, "-d"), "-d")
    elif args.data_file is not None:
        data = _data(_json_file(args.data_file, "-D"), "-D")
    metadata: dict[str, str] = {}
    if args.metadata is not None:
        metadata = _string_map(_json_arg(args.metadata, "-m"), "-m")
    elif args.metadata_file is not None:
        metadata = _string_map(_json_file(args.metadata_file, "-M"), "-M")
    for flag, value in (
        ("-c", args.concurrency),
        ("--connections", args.connections),
        ("--procs", args.procs),
    ):
        if value < 1:
            raise OptionsError(f"{flag}: must be at least 1, got {value}")
    if args.total < 0 or args.rps < 0 or args.skipFirst < 0:
        raise OptionsError("-n, -r and --skipFirst must not be negative")
    duration = parse_duration(args.duration, "-z")
    if not duration and args.total < 1:
        raise OptionsError("-n: must be at least 1 unless -z is given")
    reflect = None
    if args.reflect_metadata is not None:
        reflect = _string_map(
            _json_arg(args.reflect_metadata, "--reflect-metadata"), "--reflect-metadata"
        )
    tags = _string_map(_json_arg(args.tags, "--tags"), "--tags") if args.tags else {}
    normalise_call(args.call)
    return Options(
        host=args.host,
        call=args.call,
        data=data,
        metadata=metadata,
        reflect_metadata=reflect,
        concurrency=args.concurrency,
        total=args.total,
        rps=args.rps,
        duration_s=duration,
        timeout_s=parse_duration(args.timeout, "-t"),
        connections=args.connections,
        insecure=args.insecure,
        format=args.format,
        output=args.output,
        name=args.name,
        tags=tags,
        skip_first=args.skipFirst,
        progress=not args.no_progress,
        stamped_tokens=args.stamped_tokens,
        procs=args.procs,
    )
