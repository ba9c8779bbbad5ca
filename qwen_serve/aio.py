"""The event loop every qwen-serve process runs on, and supervised background tasks."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)
RESTART_DELAY_S = 0.5
CANCEL_WAIT_S = 5.0

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


GC_YOUNG_THRESHOLD = 50_000


def freeze_heap() -> None:
    """Fewer and shorter garbage collections on the serving path (router and worker).

    Relaying a token allocates several short-lived protobuf and asyncio objects, so
    CPython's default young-generation threshold (700) collects many times a second
    under load. Worse, a full collection walks every tracked object: a worker holds
    vLLM, torch and the tokenizer, about 700,000 objects, and one full collection took
    550-770 ms on the development machine, stalling every stream of the worker at once
    (its time to first token at concurrency 64 on an H200 was 8x the engine's). So what
    start-up made is collected once and frozen out of every later collection, as vLLM's
    own API server does (``freeze_gc_heap``). Call it once start-up is done.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


class Tasks:
    """Background tasks of one object: tracked (never fire-and-forget) and cancelled together.

    ``loop`` tasks are supervised: one that fails unexpectedly is logged and
    started again, so a bug or a library error never silently ends a loop.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None]:
        """Run ``coro`` in the background; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def loop(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` forever, starting it again (after a pause) if it fails."""
        self.spawn(self._supervise(name, factory), name=name)

    async def _supervise(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s: %s loop failed; restarting it", self.owner, name)
                await asyncio.sleep(RESTART_DELAY_S)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: background task failed", self.owner, exc_info=task.exception())

    async def cancel_all(self, timeout: float = CANCEL_WAIT_S) -> None:
        """Cancel every task and wait for them, ``timeout`` at most (a library that holds
        on to a cancelled call must not stop the process from shutting down)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=timeout)
        for task in stuck:
            logger.warning("%s: %s did not stop within %g s", self.owner, task.get_name(), timeout)

    def __len__(self) -> int:
        return len(self._tasks)
