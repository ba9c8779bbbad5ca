"""An abort is not lost when it arrives before vLLM has registered the request.

vLLM ignores ``abort()`` of an id it does not know yet; a run fenced or cancelled while
the engine is still adding it would then generate its whole budget and hold a slot.
The stand-in below has exactly that property of ``AsyncLLM`` and nothing else of it;
the real engine's aborts are covered end to end (tests/e2e/test_e2e_chat.py, tests/faults).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.v1 import queue_pb2
from worker.engine import Engine, Prepared
from worker.profiles import CPU_TINY, resolve

BUDGET = 500


class LateRegistering:
    """``AsyncLLM`` as far as aborts go: an id it has not registered yet is ignored."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.aborted: set[str] = set()
        self.adding = asyncio.Event()
        self.release = asyncio.Event()
        self.outputs = 0
        config = SimpleNamespace(
            get_diff_sampling_param=dict, max_model_len=4096, get_vocab_size=lambda: 10
        )
        self.model_config = config
        self.vllm_config = SimpleNamespace(
            scheduler_config=SimpleNamespace(enable_chunked_prefill=True)
        )
        self.renderer = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=dict))

    async def generate(
        self, _prompt: Any, _params: Any, request_id: str, **_kw: Any
    ) -> AsyncGenerator[Any, None]:
        self.adding.set()
        await self.release.wait()  # processing the input, not registered yet
        self.known.add(request_id)
        for _ in range(BUDGET):
            finished = request_id in self.aborted
            self.outputs += 1
            yield SimpleNamespace(finished=finished)
            if finished:
                return
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        if request_id in self.known:
            self.aborted.add(request_id)


class OneDeltaPerOutput:
    def feed(self, _output: Any) -> list[pb.ChatEvent]:
        return [pb.ChatEvent(delta=pb.Delta(content="x"))]

    def close(self) -> list[pb.ChatEvent]:
        return []


def engine_on(llm: LateRegistering) -> Engine:
    engine = Engine(llm, resolve(CPU_TINY), parser_cls=None)

    async def prepare(_job: queue_pb2.Job) -> Prepared:
        return Prepared(None, None, 0, OneDeltaPerOutput(), "prompt", None)  # type: ignore[arg-type]

    engine.preparer = SimpleNamespace(prepare=prepare)  # type: ignore[assignment]
    return engine


async def wanted() -> bool:
    return True


async def collect(engine: Engine, request_id: str) -> list[pb.ChatEvent]:
    return [event async for event in engine.run(request_id, queue_pb2.Job(), wanted())]


async def test_an_abort_while_vllm_adds_the_request_still_stops_it() -> None:
    llm = LateRegistering()
    engine = engine_on(llm)
    events = asyncio.create_task(collect(engine, "r1"))
    await llm.adding.wait()
    await engine.abort("r1")  # vLLM does not know r1 yet: it ignores this
    assert llm.aborted == set()
    llm.release.set()
    got = await events
    assert 0 < len(got) < 5
    assert llm.outputs < 5 < BUDGET


async def test_an_abort_before_generation_generates_nothing() -> None:
    llm = LateRegistering()
    engine = engine_on(llm)
    gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    run = engine.run("r2", queue_pb2.Job(), gate)
    first = asyncio.create_task(anext(run, None))
    await asyncio.sleep(0.01)  # run() waits on the lease now
    await engine.abort("r2")
    gate.set_result(True)
    assert await first is None
    assert llm.outputs == 0 and not llm.adding.is_set()


async def test_aborts_of_finished_runs_are_forgotten() -> None:
    llm = LateRegistering()
    llm.release.set()
    engine = engine_on(llm)
    await engine.abort("unknown")
    assert len(await collect(engine, "r3")) == BUDGET
    assert not engine._aborted and not engine._running
