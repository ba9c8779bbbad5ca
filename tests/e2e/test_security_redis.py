"""The queue on Redis with an ACL user and TLS (``rediss://``, client certificates).

A redis-server of this module's own (TLS only, default user off, one user
limited to the ``qs-acl`` prefix) carries every queue operation; a router
process reaches it with settings from QS_* variables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from redis import exceptions as redis_errors

from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue import acl
from qwen_serve.queue.broker import (
    AttemptRef,
    QueueUnavailable,
    RouterQueue,
    WorkerQueue,
    connect,
    router_queue,
    worker_queue,
)
from qwen_serve.queue.codec import Reply, WorkerStatus
from qwen_serve.queue.keys import Keys
from qwen_serve.settings import SharedSettings
from qwen_serve_dev import devstack
from router import jobs, security
from tests.security_support import Pki, make_pki
from tests.support.calls import chat, status_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test's certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"))


ACL_PREFIX = "qs-acl"
ACL_PASSWORD = security.new_key()
SENTINEL_PASSWORD = security.new_key()


@pytest.fixture(scope="module")
def secure_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """redis-server on TLS only, client certificates required, one ACL user; yields the port.

    The default user is off; the router and worker users have the least-privilege
    rules of ``qwen_serve/queue/acl.py`` for the ``qs-acl`` prefix (docs/security.md).
    """
    log_dir = tmp_path_factory.mktemp("secure-redis")
    port = devstack.free_port()
    conf = log_dir / "redis.conf"  # a file, so the password is not on a command line
    conf.write_text(
        f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {log_dir}\n'
        f"tls-cert-file {pki.path('server.crt')}\ntls-key-file {pki.path('server.key')}\n"
        f"tls-ca-cert-file {pki.path('ca.crt')}\ntls-auth-clients yes\n"
        "user default off\n"
        f"{acl.user_line('qs-router', ACL_PASSWORD, acl.router_rules(Keys(ACL_PREFIX)))}\n"
        f"{acl.user_line('qs-worker', ACL_PASSWORD, acl.worker_rules(Keys(ACL_PREFIX)))}\n"
        f"user sentinel on >{ACL_PASSWORD} allchannels +multi +slaveof +ping +exec +subscribe "
        "+config|rewrite +role +publish +info +client|setname +client|kill +script|kill\n"
    )
    conf.chmod(0o600)
    proc = devstack.spawn("redis-tls", ["redis-server", str(conf)], log_dir)
    try:
        devstack.wait_port(port, proc)
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def tls_sentinel(
    pki: Pki, secure_redis: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A Sentinel on TLS only (client certificates, a password) monitoring secure_redis."""
    log_dir = tmp_path_factory.mktemp("tls-sentinel")
    port = devstack.free_port()
    conf = log_dir / "sentinel.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {log_dir}\ntls-replication yes\n"
        f"tls-cert-file {pki.path('server.crt')}\ntls-key-file {pki.path('server.key')}\n"
        f"tls-ca-cert-file {pki.path('ca.crt')}\ntls-auth-clients yes\n"
        f"requirepass {SENTINEL_PASSWORD}\n"
        f"sentinel monitor qs 127.0.0.1 {secure_redis} 1\n"
        f"sentinel auth-user qs sentinel\nsentinel auth-pass qs {ACL_PASSWORD}\n"
    )
    conf.chmod(0o600)
    proc = devstack.spawn("sentinel-tls", ["redis-server", str(conf), "--sentinel"], log_dir)
    try:
        devstack.wait_port(port, proc)
        yield port
    finally:
        proc.stop()


async def test_sentinel_over_tls_with_passwords(pki: Pki, tls_sentinel: int) -> None:
    """rediss+sentinel://: TLS and a password to the Sentinel, TLS and the ACL user to
    the primary it names; a wrong Sentinel password is refused."""
    url = f"rediss+sentinel://qs-router:{ACL_PASSWORD}@127.0.0.1:{tls_sentinel}/qs/0"
    settings = _redis_settings(pki, 0).model_copy(
        update={"redis_url": url, "redis_sentinel_password": SENTINEL_PASSWORD}
    )
    queue = router_queue(settings, "router-sentinel")
    try:
        await queue.heartbeat()
        assert await queue.surviving_mark() == queue.mark
    finally:
        await queue.close()
    wrong = settings.model_copy(update={"redis_sentinel_password": security.new_key()})
    queue = router_queue(wrong, "router-refused")
    try:
        with pytest.raises(QueueUnavailable):
            await queue.heartbeat()
    finally:
        await queue.close()


def _redis_settings(
    pki: Pki,
    port: int,
    password: str = ACL_PASSWORD,
    scheme: str = "rediss",
    user: str = "qs-router",
    **tls: str | None,
) -> SharedSettings:
    """Settings of the ACL user over TLS with the client certificate (overridable)."""
    files = {
        "redis_tls_ca_file": pki.path("ca.crt"),
        "redis_tls_cert_file": pki.path("client.crt"),
        "redis_tls_key_file": pki.path("client.key"),
    }
    return SharedSettings(
        redis_url=f"{scheme}://{user}:{password}@127.0.0.1:{port}/0",
        key_prefix=ACL_PREFIX,
        **{**files, **tls},
    )


async def test_queue_runs_over_redis_acl_and_tls(pki: Pki, secure_redis: int) -> None:
    """Every queue operation works as the router and worker users over TLS; other
    keys, FLUSHALL, CONFIG and each other's commands are denied."""
    routers = router_queue(_redis_settings(pki, secure_redis), "router-acl")
    workers = worker_queue(
        _redis_settings(pki, secure_redis, user="qs-worker"), "worker-acl", block_ms=100
    )
    try:
        await workers.ensure_group()
        await workers.heartbeat(WorkerStatus(worker_id="worker-acl"))
        await routers.heartbeat()
        assert [w.worker_id for w in await routers.live_workers()] == ["worker-acl"]
        job = jobs.make_job(
            chat(), router_id="router-acl", reply_stream=routers.reply_stream,
            deadline_unix_ms=0, trace={}, tenant="alpha",
        )  # fmt: skip
        (written,) = await routers.submit([job])
        assert await routers.queue_depth() == 1
        (entry_id, claimed), *_ = await workers.claim(10, 100)
        assert claimed is not None and claimed.request_id == job.request_id
        assert claimed.tenant == "alpha" and entry_id == written
        ref = AttemptRef(job.request_id, 0, "alpha", entry_id)
        assert (await workers.acquire(ref)).holder is None
        reply = Reply(request_id=job.request_id, worker_id="worker-acl", attempt=0, seq=1)
        await workers.send([(routers.reply_stream, reply)], [(entry_id, ref)])
        replies = await routers.read_replies(b"0-0", 100)
        assert [r.request_id for _, r in replies if r] == [job.request_id]
        lease = await workers.lease_of(job.request_id, 0)
        assert lease is not None and lease.done
        assert await workers.live_routers() == {"router-acl"}
        assert await routers.surviving_mark() == routers.mark
        assert await _abort_seen(routers, workers, job.request_id)
        for command in (("GET", "qs:jobs"), ("FLUSHALL",), ("CONFIG", "GET", "*")):
            for queue in (routers, workers):
                with pytest.raises(redis_errors.NoPermissionError):
                    await queue.redis.execute_command(*command)
        with pytest.raises(redis_errors.NoPermissionError):
            await workers.redis.xrange(routers.reply_stream)
        with pytest.raises(redis_errors.NoPermissionError):
            await routers.redis.xrange(routers.keys.jobs)
    finally:
        await workers.leave()
        await routers.close()
        await workers.close()


async def _abort_seen(routers: RouterQueue, workers: WorkerQueue, request_id: str) -> bool:
    """Announce an abort until the worker's subscription hears it (pub/sub + marker)."""
    aborts = workers.aborts()
    heard = asyncio.ensure_future(anext(aborts))
    try:
        while not heard.done():
            await routers.announce_aborts([(request_id, "alpha")])
            await asyncio.wait({heard}, timeout=0.2)
    finally:
        await aborts.aclose()
    return heard.result() == request_id and await workers.is_aborted(request_id, "alpha")


async def test_redis_refuses_wrong_password_plaintext_and_no_client_cert(
    pki: Pki, secure_redis: int
) -> None:
    """Wrong password, plaintext, an untrusted server or no client certificate: no queue."""
    port = secure_redis
    refused = {
        "wrong password": _redis_settings(pki, port, password=security.new_key()),
        "plaintext": _redis_settings(
            pki, port, scheme="redis", redis_tls_ca_file=None,
            redis_tls_cert_file=None, redis_tls_key_file=None,
        ),
        "untrusted server": _redis_settings(pki, port, redis_tls_ca_file=pki.path("rogue-ca.crt")),
        "no client cert": _redis_settings(
            pki, port, redis_tls_cert_file=None, redis_tls_key_file=None
        ),
    }  # fmt: skip
    for why, settings in refused.items():
        queue = router_queue(settings, "router-refused")
        try:
            await queue.ping()
        except QueueUnavailable:
            continue
        finally:
            await queue.close()
        pytest.fail(f"{why}: Redis answered")
    with pytest.raises(ValueError, match="rediss"):
        connect(_redis_settings(pki, port, scheme="redis"))


async def test_router_process_on_acl_tls_redis(pki: Pki, secure_redis: int, tmp_path: Path) -> None:
    """A router given rediss:// with the ACL user and TLS files via QS_* reaches Redis."""
    port = devstack.free_port()
    settings = _redis_settings(pki, secure_redis)
    env = {
        "QS_REDIS_TLS_CA_FILE": pki.path("ca.crt"),
        "QS_REDIS_TLS_CERT_FILE": pki.path("client.crt"),
        "QS_REDIS_TLS_KEY_FILE": pki.path("client.key"),
    }
    proc = devstack.start_router(
        settings.redis_url,
        port,
        tmp_path,
        "--key-prefix",
        ACL_PREFIX,
        name="router-acl",
        env=env,
    )
    target = f"127.0.0.1:{port}"
    try:
        devstack.wait_serving(target, [proc], 60, service="liveness")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = serve_pb2_grpc.InferenceStub(channel)
            exc = await status_of(stub, chat(max_tokens=2), metadata=())
        # Redis answered (otherwise: "queue (Redis) is unreachable"); no worker runs there.
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert "no worker" in (exc.details() or "")
    finally:
        proc.stop()
    assert ACL_PASSWORD not in proc.log_path.read_text()
