"""The event loop choice (qwen_serve/aio.py)."""

from __future__ import annotations

import asyncio

import pytest

from qwen_serve import aio


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.LOOP_ENV, raising=False)
    assert aio.run(_loop_module()).startswith("uvloop")


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.LOOP_ENV, "asyncio")
    assert aio.run(_loop_module()).startswith("asyncio")
