"""The event loop every qwen-serve process runs on."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOP_ENV = "QS_EVENT_LOOP"
"""``uvloop`` (the default where installed) or ``asyncio``."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (as vLLM's own servers do), or asyncio's loop.

    uvloop is a dependency on Linux and macOS; ``QS_EVENT_LOOP=asyncio`` selects
    asyncio's own loop, which is also the fallback where uvloop is missing.
    """
    if os.environ.get(LOOP_ENV, "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
