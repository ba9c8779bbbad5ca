"""The fault stack (tests/fault_support.py), shared by the fault-injection modules here
and stopped after the last of them (its two engines are not kept for other tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from qwen_serve.api.v1 import serve_pb2_grpc
from tests.fault_support import FaultStack, fault_stack


@pytest.fixture(scope="package")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FaultStack]:
    """redis-server (append-only file), two workers and a router, as real processes."""
    with fault_stack(tmp_path_factory.mktemp("faults")) as stack:
        yield stack


@pytest.fixture
async def fstub(faults: FaultStack) -> AsyncIterator[serve_pb2_grpc.InferenceStub]:
    """An Inference stub on a fresh channel to the fault stack's router."""
    async with grpc.aio.insecure_channel(faults.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)
