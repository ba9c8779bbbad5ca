"""Logging set-up shared by router and worker (tracing and metrics come later)."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    """Human-readable logs at QS_LOG_LEVEL (default INFO)."""
    logging.basicConfig(
        level=os.environ.get("QS_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
