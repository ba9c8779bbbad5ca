"""A scripted stand-in for the engine, for unit tests of the worker and the dispatcher.

It has the worker's ``EngineLike`` shape and streams fixed events; tests that claim
to test the system run the real vLLM engine (tests/e2e, tests/faults).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import Job


class ScriptedEngine:
    """Streams one delta, Finished and Usage per job once ``wanted`` says so; a job
    waits for ``gate`` first when one is set. Records the jobs it ran and aborted."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.runs: list[str] = []
        self.aborted: list[str] = []
        self._aborts: dict[str, asyncio.Event] = {}

    async def run(
        self, request_id: str, job: Job, wanted: Awaitable[bool]
    ) -> AsyncGenerator[pb.ChatEvent, None]:
        if not await wanted:
            return
        self.runs.append(request_id)
        aborted = self._aborts.setdefault(request_id, asyncio.Event())
        if self.gate is not None:
            await _first(self.gate, aborted)
        if aborted.is_set():  # as vLLM ends an aborted request
            yield pb.ChatEvent(finished=pb.Finished(index=0, reason=pb.FINISH_REASON_ABORT))
            yield pb.ChatEvent(usage=pb.Usage(prompt_tokens=3, completion_tokens=0))
            return
        yield pb.ChatEvent(delta=pb.Delta(index=0, content="hi", token_ids=[7, 8]))
        yield pb.ChatEvent(finished=pb.Finished(index=0, reason=pb.FINISH_REASON_STOP))
        yield pb.ChatEvent(usage=pb.Usage(prompt_tokens=3, completion_tokens=2))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._aborts.setdefault(request_id, asyncio.Event()).set()

    def num_unfinished(self) -> int:
        return 0

    def model_info(self) -> pb.ModelInfo:
        return pb.ModelInfo(served_model_name="scripted", max_context_tokens=4096)

    async def check_health(self) -> None:
        """Always healthy."""


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
