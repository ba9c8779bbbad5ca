"""``python -m qwen_serve_dev.stallmon``: how late a sleeping process wakes up.

Run beside a test or benchmark: every ``--tick`` seconds it sleeps and prints one line
when the wake-up comes more than ``--over`` seconds late, with the host's steal time
since the last line. Stalls of whole processes (CPU starvation, a paused VM) show up
here; they are what made live workers miss heartbeats in the fault tests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def steal_ticks() -> int:
    """The host's steal time so far, in clock ticks (0 where /proc/stat has none)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


def main(argv: list[str] | None = None) -> None:
    """CLI: print late wake-ups until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m qwen_serve_dev.stallmon")
    parser.add_argument("--tick", type=float, default=0.2, help="sleep per round (s)")
    parser.add_argument("--over", type=float, default=0.5, help="report lateness above (s)")
    args = parser.parse_args(argv)
    last, steal = time.monotonic(), steal_ticks()
    try:
        while True:
            time.sleep(args.tick)
            now = time.monotonic()
            late = now - last - args.tick
            if late > args.over:
                stolen = steal_ticks()
                print(f"{time.strftime('%H:%M:%S')} late {late:.2f} s, steal +{stolen - steal}")
                steal = stolen
            last = now
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
