"""Units of router/security.py, request ids, and the queue's no-pickle rule."""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path

import pytest

from qwen_serve.errors import UNAUTHENTICATED, RequestError
from qwen_serve.settings import RouterSettings
from router import jobs, security
from tests.security_support import KEYS, write_keys_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    """A key file of two tenants."""
    return write_keys_file(tmp_path / "api-keys")


def test_key_file_entries_and_refusals() -> None:
    """Plain and digest lines load; bad lines are refused without quoting the key."""
    key = security.new_key()
    good = f"# c\nt1:{key}\n t2:sha256:{'ab' * 32} \n"
    assert security.parse_keys(good) == [("t1", security.digest(key)), ("t2", bytes([0xAB]) * 32)]
    bad = {
        "short-key:tooshort": "16+",
        f"{key}": "tenant:key",
        f"bad tenant:{key}": "tenant:key",
        f"t:{key} x": "no spaces",
        "t:sha256:abc": "64 hex",
        f"a:{key}\nb:{key}": "twice",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message) as info:
            security.parse_keys(text, "f")
        assert key not in str(info.value) and "tooshort" not in str(info.value)


def test_authenticator_maps_bearer_keys_to_tenants() -> None:
    """Right key → tenant (scheme case-insensitive); anything else → UNAUTHENTICATED."""
    auth = security.Authenticator(security.parse_keys(f"alpha:{KEYS['alpha']}"))
    assert auth.tenant([("authorization", f"bearer  {KEYS['alpha']}")]) == "alpha"
    refused = {
        "missing": [("x-other", "1")],
        "wrong key": [("authorization", f"Bearer {KEYS['beta']}")],
        "no scheme": [("authorization", KEYS["alpha"])],
        "basic": [("authorization", f"Basic {KEYS['alpha']}")],
        "twice": [("authorization", f"Bearer {KEYS['alpha']}")] * 2,
    }
    for why, metadata in refused.items():
        with pytest.raises(RequestError) as info:
            auth.tenant(metadata)
        assert (info.value.code, info.value.field) == (UNAUTHENTICATED, "authorization"), why
    assert security.Authenticator(()).tenant(None) == ""


def test_start_up_warns_when_open(caplog: pytest.LogCaptureFixture, keys_file: str) -> None:
    """No keys → a warning; a non-loopback bind without TLS → a warning; TLS + keys → none."""
    assert security.is_loopback("127.0.0.1:1") and security.is_loopback("[::1]:1")
    assert security.is_loopback("localhost:1") and security.is_loopback("unix:/tmp/s")
    assert not security.is_loopback("[::]:1") and not security.is_loopback("0.0.0.0:1")
    open_settings = RouterSettings(listen="[::]:50051")
    security.log_posture(open_settings, security.Authenticator.from_settings(open_settings))
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        "API keys are OFF",
        "listening on [",
    ]
    caplog.clear()
    closed = RouterSettings(
        listen="[::]:50051", api_keys_file=keys_file, tls_cert_file="c", tls_key_file="k"
    )
    security.log_posture(closed, security.Authenticator.from_settings(closed))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with pytest.raises(ValueError, match="together"):
        security.server_credentials(RouterSettings(tls_key_file="k"))
    with pytest.raises(ValueError, match="needs"):
        security.server_credentials(RouterSettings(tls_client_ca_file="ca"))
    with pytest.raises(ValueError, match="auth_health needs"):
        security.Authenticator.from_settings(RouterSettings(auth_health=True))


def test_queue_code_never_unpickles_or_evaluates() -> None:
    """Only protobuf crosses the queue: no pickle/marshal/shelve, no eval/exec in our code."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    found: list[str] = []
    for package in ("qwen_serve", "router", "worker"):
        for file in (ROOT / package).rglob("*.py"):
            if file.name.endswith("_pb2.py"):
                continue
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    names = [node.func.id] if node.func.id in ("eval", "exec") else []
                where = file.relative_to(ROOT)
                found += [f"{where}: {n}" for n in names if n in {*banned_modules, "eval", "exec"}]
    assert found == []


def test_request_ids_are_unguessable() -> None:
    """128 random bits, URL-safe, no repeats over many."""
    ids = [jobs.new_request_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids[:1000]:
        assert re.fullmatch(r"req_[A-Za-z0-9_-]{22}", rid)
        assert len(base64.urlsafe_b64decode(rid[4:] + "==")) == 16
