"""Request builders, the one event collector (``collect``) and engine-state probes for the
tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import worker_queue
from qwen_serve.settings import SharedSettings


def user(text: str) -> pb.Message:
    """A user message with one text part."""
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def chat(text: str = "Hello there", max_tokens: int = 8, **sampling: object) -> pb.ChatRequest:
    """A one-message chat with thinking off and greedy sampling by default."""
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for key, value in sampling.items():
        setattr(params, key, value)
    return pb.ChatRequest(messages=[user(text)], enable_thinking=False, sampling=params)


@dataclass
class Collected:
    """Every event of one stream, sorted by kind."""

    events: list[pb.ChatEvent] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """Event kinds in order (consecutive deltas folded into one)."""
        out: list[str] = []
        for event in self.events:
            kind = str(event.WhichOneof("event"))
            if not (out and out[-1] == kind == "delta"):
                out.append(kind)
        return out

    def of(self, kind: str) -> list[pb.ChatEvent]:
        """Events of one kind."""
        return [e for e in self.events if e.WhichOneof("event") == kind]

    def token_ids(self, index: int = 0) -> list[int]:
        """Generated token ids of one choice."""
        return [t for e in self.of("delta") if e.delta.index == index for t in e.delta.token_ids]

    def text(self, index: int = 0) -> str:
        """Reasoning plus content of one choice."""
        return "".join(
            e.delta.reasoning + e.delta.content for e in self.of("delta") if e.delta.index == index
        )


async def collect(
    stub: serve_pb2_grpc.InferenceStub,
    request: pb.ChatRequest | pb.GenerateRequest,
    timeout: float = 120,
    *,
    metadata: Sequence[tuple[str, str]] = (),
) -> Collected:
    """Run one Chat or Generate call (with ``metadata``) to its end."""
    out = Collected()
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    async for event in call(request, metadata=metadata, timeout=timeout):
        out.events.append(event)
    return out


async def status_of(
    stub: serve_pb2_grpc.InferenceStub,
    request: pb.ChatRequest | pb.GenerateRequest,
    timeout: float = 60,
    *,
    metadata: Sequence[tuple[str, str]] = (),
) -> grpc.aio.AioRpcError:
    """The error status a call ends with (fails if it succeeds)."""
    try:
        await collect(stub, request, timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def running_in_engines(redis_url: str, prefix: str) -> int:
    """Requests the live workers report running in their engines."""
    queue = worker_queue(  # a patient reader: a loaded host may stall Redis for seconds
        SharedSettings(redis_url=redis_url, key_prefix=prefix), "test-observer", block_ms=10_000
    )
    try:
        return sum(w.running for w in await queue.live_workers())
    finally:
        await queue.close()


async def wait_engines_idle(redis_url: str, prefix: str, timeout: float = 20) -> int:
    """Poll worker heartbeats until no request runs; returns the last count."""
    deadline = time.monotonic() + timeout
    running = await running_in_engines(redis_url, prefix)
    while running and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        running = await running_in_engines(redis_url, prefix)
    return running


async def engine_version(stub: serve_pb2_grpc.InferenceStub) -> tuple[int, int]:
    """(major, minor) of the vLLM the workers run, from GetModelInfo."""
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    major, minor, *_ = (info.engine_version.split("+")[0] + ".0.0").split(".")
    return int(major), int(minor)


class LogWatch:
    """What the stack's processes log from now on (``assert_clean`` checks for tracebacks)."""

    def __init__(
        self, log_dir: Path, names: tuple[str, ...] = ("router.log", "worker.log")
    ) -> None:
        self.paths = [log_dir / name for name in names]
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in self.paths}

    def new_text(self, path: Path) -> str:
        """The part of ``path`` written since this watch began."""
        with path.open("rb") as log:
            log.seek(self.offsets[path])
            return log.read().decode(errors="replace")

    def assert_clean(self, *needles: str) -> None:
        """No traceback (nor any of ``needles``) in what was logged since."""
        for path in self.paths:
            text = self.new_text(path)
            for needle in ("Traceback", *needles):
                assert needle not in text, f"{path.name}: {needle}\n{text[-3000:]}"
