"""The event loop every qwen-serve process runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (as vLLM's own servers do) where it is installed, else asyncio.

    uvloop is a dependency on Linux and macOS; asyncio's loop is the fallback elsewhere.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
