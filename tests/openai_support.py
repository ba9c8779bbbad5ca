"""Routers with the OpenAI-compatible HTTP API on the session stack, and request helpers.

Each HTTP router is a real ``python -m router`` process with ``--http-listen`` on
the stack's Redis and key prefix, so its requests reach the stack's real worker.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from qwen_serve_dev import devstack
from tests.conftest import Stack

MODEL = "qwen3.5-tiny"
NO_THINKING: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CALL_MARKUP = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
"""A qwen3_coder call as Qwen3.5 writes it; a regex makes the random model spell it."""


@dataclass
class HttpRouter:
    """A router process serving HTTP; ``base`` is its root URL."""

    proc: devstack.Proc
    base: str
    grpc_target: str

    @property
    def v1(self) -> str:
        """The OpenAI SDK's base_url."""
        return self.base + "/v1"


@contextlib.contextmanager
def http_router(
    stack: Stack,
    *flags: str,
    name: str,
    env: dict[str, str] | None = None,
    prefix: str | None = None,
    scheme: str = "http",
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[HttpRouter]:
    """A router with ``--http-listen`` on the stack's Redis (``prefix``: another key prefix)."""
    port, http_port = devstack.free_port(), devstack.free_port()
    proc = devstack.start_router(
        stack.redis_url,
        port,
        stack.log_dir,
        *("--key-prefix", prefix or stack.key_prefix),
        *("--http-listen", f"127.0.0.1:{http_port}"),
        *flags,
        name=name,
        env=env,
    )
    target = f"127.0.0.1:{port}"
    try:
        service = "" if prefix is None else "liveness"
        devstack.wait_serving(target, [proc], 60, service=service, credentials=credentials)
        yield HttpRouter(proc, f"{scheme}://127.0.0.1:{http_port}", target)
    finally:
        proc.stop()


def user(text: str, *image_urls: str) -> dict[str, Any]:
    """A user message: image parts first, then the text."""
    if not image_urls:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": u}} for u in image_urls
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def spelled(text: str) -> dict[str, Any]:
    """extra_body that makes the engine write exactly ``text`` (thinking off)."""
    return {**NO_THINKING, "structured_outputs": {"regex": re.escape(text)}}
