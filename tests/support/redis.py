"""The one redis-server fixture of the tests (``tests/conftest.py`` offers it to every
module); tests that need Redis with TLS, ACLs or Sentinel start their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qwen_serve_dev import devstack


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away redis-server for one test module (its tests use their own key prefixes)."""
    proc, url = devstack.start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        proc.stop()
