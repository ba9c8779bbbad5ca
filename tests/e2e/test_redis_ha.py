"""Redis Sentinel and least-privilege ACL users, with the whole stack running under them.

A primary, a replica and three Sentinels on localhost (every one with a
password; the data nodes' default user off), a worker with the CPU engine
and a router, each connecting through the Sentinels as its own ACL user
(``qwen_serve/queue/acl.py``). The first test proves the stack works under
those users and that they are denied everything else; the second kills the
primary mid-stream and measures what in-flight streams get and how long new
requests wait while the Sentinels fail over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from transformers import AutoTokenizer

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue import acl
from qwen_serve.queue.keys import Keys
from qwen_serve_dev import devstack
from router.security import new_key
from tests.fault_support import (
    Stream,
    assert_exact,
    long_chat,
    outcome,
    run_stream,
    start_streams,
)
from tests.reliability import Scenario, record
from tests.support.calls import chat

pytestmark = pytest.mark.e2e

PREFIX = "qs-ha"
SERVICE = "qsmaster"
KEYS = Keys(PREFIX)
PASSWORDS = {name: new_key() for name in ("admin", "router", "worker", "repl", "sentinel", "sent")}
USERS = {
    "admin": "~* &* +@all",
    "repl": "+psync +replconf +ping",
    "sentinel": "allchannels +multi +slaveof +ping +exec +subscribe +config|rewrite +role "
    "+publish +info +client|setname +client|kill +script|kill",
}


def _password(user: str) -> str:
    return PASSWORDS[user.removeprefix("qs-")]


@dataclass
class HaStack:
    """The processes of the Sentinel stack."""

    log_dir: Path
    ports: dict[str, int]
    procs: dict[str, devstack.Proc]
    target: str

    def url(self, user: str) -> str:
        sentinels = ",".join(f"127.0.0.1:{self.ports[f's{i}']}" for i in range(3))
        return f"redis+sentinel://{user}:{_password(user)}@{sentinels}/{SERVICE}/0"

    def admin(self, node: str) -> aioredis.Redis:
        return aioredis.Redis(port=self.ports[node], username="admin", password=PASSWORDS["admin"])


def _data_conf(log_dir: Path, name: str, port: int, primary: int | None) -> Path:
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {log_dir}",
        'save ""',
        "appendonly yes",
        f"appendfilename {name}.aof",
        f"appenddirname {name}-aof",
        "user default off",
        f"masteruser repl\nmasterauth {PASSWORDS['repl']}",
        acl.user_line("qs-router", PASSWORDS["router"], acl.router_rules(KEYS)),
        acl.user_line("qs-worker", PASSWORDS["worker"], acl.worker_rules(KEYS)),
        *(acl.user_line(u, PASSWORDS[u], rules.split()) for u, rules in USERS.items()),
    ]
    if primary is not None:
        lines.append(f"replicaof 127.0.0.1 {primary}")
    conf = log_dir / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    return conf


def _sentinel_conf(log_dir: Path, name: str, port: int, primary: int) -> Path:
    conf = log_dir / f"{name}.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {log_dir}\n"
        f"requirepass {PASSWORDS['sent']}\n"
        f"sentinel sentinel-pass {PASSWORDS['sent']}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
        f"sentinel auth-user {SERVICE} sentinel\n"
        f"sentinel auth-pass {SERVICE} {PASSWORDS['sentinel']}\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
    )
    conf.chmod(0o600)
    return conf


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[HaStack]:
    log_dir = tmp_path_factory.mktemp("ha")
    ports = {n: devstack.free_port() for n in ("primary", "replica", "s0", "s1", "s2", "grpc")}
    procs: dict[str, devstack.Proc] = {}
    stack = HaStack(log_dir, ports, procs, f"127.0.0.1:{ports['grpc']}")
    try:
        for name, primary in (("primary", None), ("replica", ports["primary"])):
            conf = _data_conf(log_dir, name, ports[name], primary)
            procs[name] = devstack.spawn(name, ["redis-server", str(conf)], log_dir)
            devstack.wait_port(ports[name], procs[name])
        for i in range(3):
            conf = _sentinel_conf(log_dir, f"s{i}", ports[f"s{i}"], ports["primary"])
            procs[f"s{i}"] = devstack.spawn(
                f"s{i}", ["redis-server", str(conf), "--sentinel"], log_dir
            )
            devstack.wait_port(ports[f"s{i}"], procs[f"s{i}"])
        env = {"QS_REDIS_SENTINEL_PASSWORD": PASSWORDS["sent"]}
        flags = ("--key-prefix", PREFIX)
        procs["worker"] = devstack.start_worker(stack.url("qs-worker"), log_dir, *flags, env=env)
        procs["router"] = devstack.start_router(
            stack.url("qs-router"), ports["grpc"], log_dir, *flags, env=env
        )
        devstack.wait_serving(stack.target, list(procs.values()))
        yield stack
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop(timeout=20)


@pytest.fixture
async def hstub(ha: HaStack) -> AsyncIterator[serve_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(ha.target) as channel:
        yield serve_pb2_grpc.InferenceStub(channel)


async def _denials(ha: HaStack, node: str) -> list[str]:
    """ACL LOG entries of the stack's users on ``node``."""
    admin = ha.admin(node)
    try:
        entries = await admin.acl_log()
    finally:
        await admin.aclose()
    return [f"{e['username']}: {e['object']} ({e['reason']})" for e in entries
            if e["username"] in ("qs-router", "qs-worker")]  # fmt: skip


DENIED = {
    "both": [
        ("SCAN", "0"),
        ("RANDOMKEY",),
        ("DBSIZE",),
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("FUNCTION", "FLUSH"),
        ("SCRIPT", "FLUSH"),
        ("EVAL", "return 1", "0"),
        ("SELECT", "1"),
        ("CONFIG", "GET", "*"),
        ("GET", "other:key"),
        ("DEL", KEYS.jobs),
    ],
    "qs-router": [
        ("XRANGE", KEYS.jobs, "-", "+"),
        ("XREADGROUP", "GROUP", "workers", "x", "STREAMS", KEYS.jobs, ">"),
    ],
    "qs-worker": [
        ("PUBLISH", KEYS.aborts, "req_x"),
        ("XRANGE", KEYS.replies("r"), "-", "+"),
        ("XREAD", "STREAMS", KEYS.replies("r"), "0"),
        ("SET", KEYS.abort_marker("x"), "1"),
    ],
}


async def _assert_denied(ha: HaStack, user: str) -> None:
    client = aioredis.Redis(port=ha.ports["primary"], username=user, password=_password(user))
    try:
        await client.ping()
        for command in DENIED["both"] + DENIED[user]:
            with pytest.raises(redis_errors.NoPermissionError):
                await client.execute_command(*command)
    finally:
        await client.aclose()


async def test_the_stack_runs_under_least_privilege_users(
    ha: HaStack, hstub: serve_pb2_grpc.InferenceStub
) -> None:
    """Streams, cancels, Abort and model info work through Sentinel as the router and
    worker users, with no denial logged; everything else is denied to them."""
    done = await run_stream(hstub, chat(max_tokens=8))
    assert done.complete and len(done.token_ids) == 8, done
    progress = asyncio.Event()
    out = Stream()
    task = asyncio.create_task(run_stream(hstub, long_chat(1, 2000), progress, out=out))
    await asyncio.wait_for(progress.wait(), 120)
    assert (await hstub.Abort(pb.AbortRequest(request_id=out.request_id))).found
    assert (await asyncio.wait_for(task, 60)).aborted
    info = await hstub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.live_workers == 1
    assert await _denials(ha, "primary") == []
    await _assert_denied(ha, "qs-router")
    await _assert_denied(ha, "qs-worker")


async def _primary_port(ha: HaStack) -> int:
    sentinel = aioredis.Redis(port=ha.ports["s0"], password=PASSWORDS["sent"])
    try:
        host_port = await sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
    finally:
        await sentinel.aclose()
    return int(host_port[1])


async def test_sentinel_failover_mid_stream(
    ha: HaStack, hstub: serve_pb2_grpc.InferenceStub, tiny_model: Path
) -> None:
    """SIGKILL the primary with streams in flight: the Sentinels promote the replica; the
    streams continue token-exact and requests sent meanwhile wait and complete."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokens = 200
    tasks, _ = await start_streams(hstub, 4, tokens, timeout=180)
    assert await _primary_port(ha) == ha.ports["primary"]
    killed = time.monotonic()
    ha.procs["primary"].kill()
    new = [asyncio.create_task(run_stream(hstub, chat(f"new {i}", max_tokens=4))) for i in range(3)]
    while await _primary_port(ha) != ha.ports["replica"]:
        assert time.monotonic() - killed < 60, "no failover"
        await asyncio.sleep(0.1)
    failover_s = time.monotonic() - killed
    streams = list(await asyncio.wait_for(asyncio.gather(*tasks), 300))
    waited = list(await asyncio.wait_for(asyncio.gather(*new), 300))
    assert_exact(streams, tokens, tokenizer.backend_tokenizer)
    assert all(s.complete for s in waited), waited
    gaps = [s.ended_at - killed for s in waited]
    result = outcome([*streams, *waited])
    result.recovery_s = max(gaps)
    result.note = (
        f"the Sentinels promoted the replica {failover_s:.1f} s after the kill; "
        f"{len(streams)} streams continued token-exact; 3 requests sent right after the kill "
        f"ended {min(gaps):.1f}-{max(gaps):.1f} s after it"
    )
    record(Scenario.SENTINEL_FAILOVER, result)
    assert await _denials(ha, "replica") == []  # the promoted replica
