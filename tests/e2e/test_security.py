"""TLS, mutual TLS, API keys and tenants, size caps and log hygiene on live routers.

Extra routers run against the session stack's Redis and worker, with
certificates made in the test (tests/security_support.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve.queue.broker import connect
from qwen_serve.queue.codec import Job, decode
from qwen_serve.settings import SharedSettings
from qwen_serve_dev import devstack
from router import security
from tests.conftest import Stack
from tests.security_support import (
    KEYS,
    Metadata,
    Pki,
    bearer,
    code,
    make_pki,
    tls,
    write_keys_file,
)
from tests.support.calls import chat, collect, status_of, wait_engines_idle

pytestmark = pytest.mark.e2e

INFERENCE = "qwen_serve.api.v1.Inference"
Router = tuple[devstack.Proc, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test's certificates."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test's API key file."""
    return write_keys_file(tmp_path_factory.mktemp("keys") / "api-keys")


def _start(
    stack: Stack,
    name: str,
    *flags: str,
    credentials: grpc.ChannelCredentials,
    env: dict[str, str] | None = None,
) -> Iterator[Router]:
    """An extra router on the stack's Redis; stopped when the generator closes."""
    port = devstack.free_port()
    proc = devstack.start_router(
        stack.redis_url, port, stack.log_dir, "--key-prefix", stack.key_prefix, *flags,
        name=name, env=env,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        devstack.wait_serving(target, [proc], 60, credentials=credentials)
        yield proc, target
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def health_port() -> int:
    """The TLS router's plaintext health-only port."""
    return devstack.free_port()


@pytest.fixture(scope="module")
def tls_router(stack: Stack, pki: Pki, keys_file: str, health_port: int) -> Iterator[Router]:
    """TLS (no client certificates), API keys from the environment, small caps."""
    yield from _start(
        stack, "router-tls",
        "--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key"),
        "--max-inflight-per-tenant", "1", "--max-message-bytes", "65536",
        "--health-listen", f"127.0.0.1:{health_port}",
        env={"QS_API_KEYS_FILE": keys_file}, credentials=tls(pki),
    )  # fmt: skip


@pytest.fixture(scope="module")
def mtls_router(stack: Stack, pki: Pki, keys_file: str) -> Iterator[Router]:
    """Mutual TLS, API keys, and keys required for health and reflection too."""
    creds = grpc.composite_channel_credentials(
        tls(pki, "client"), grpc.access_token_call_credentials(KEYS["beta"])
    )
    yield from _start(
        stack, "router-mtls",
        "--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key"),
        "--tls-client-ca-file", pki.path("ca.crt"), "--api-keys-file", keys_file, "--auth-health",
        credentials=creds,
    )  # fmt: skip


async def test_tls_serves_and_plaintext_fails(pki: Pki, tls_router: Router) -> None:
    """A TLS client with a key streams a chat; plaintext and an untrusted server fail."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        events = []
        async for event in stub.Chat(chat(max_tokens=4), metadata=bearer("alpha"), timeout=120):
            events.append(event.WhichOneof("event"))
        assert events[0] == "started" and events[-1] == "usage"
    async with grpc.aio.insecure_channel(target) as channel:
        info = serve_pb2_grpc.InferenceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=bearer("alpha"), timeout=10
        )
        assert await code(info) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(target, tls(pki, ca="rogue-ca")) as channel:
        info = serve_pb2_grpc.InferenceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=bearer("alpha"), timeout=10
        )
        assert await code(info) == grpc.StatusCode.UNAVAILABLE


async def test_every_inference_call_needs_a_key(pki: Pki, tls_router: Router) -> None:
    """Missing or wrong key → UNAUTHENTICATED naming authorization; each tenant's keys work."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        wrong = (("authorization", f"Bearer {security.new_key()}"),)
        for metadata in ((), wrong):
            for call in (
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10),
                stub.Abort(pb.AbortRequest(request_id="req_x"), metadata=metadata, timeout=10),
            ):
                assert await code(call) == grpc.StatusCode.UNAUTHENTICATED
            for request in (chat(max_tokens=2), pb.GenerateRequest(text="hi")):
                exc = await status_of(stub, request, metadata=metadata)
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                assert (exc.details() or "").startswith("authorization")
        for tenant in KEYS:
            info = await stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=bearer(tenant), timeout=10
            )
            assert info.live_workers >= 1


async def test_health_and_reflection_open_by_default(
    pki: Pki, tls_router: Router, health_port: int
) -> None:
    """Without auth_health, probes and reflection need no key; the plaintext health port
    (for kubelet probes) answers health and nothing else."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert INFERENCE in await _services(channel, ())
    plain = f"127.0.0.1:{health_port}"
    assert devstack.health_status(plain) == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(plain) as channel:
        info = serve_pb2_grpc.InferenceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=bearer("alpha"), timeout=10
        )
        assert await code(info) == grpc.StatusCode.UNIMPLEMENTED
        # Reflection is not served there: the stream fails (UNIMPLEMENTED, or INTERNAL
        # when grpc resets a bidi stream to an unknown method first) and lists nothing.
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await _services(channel, ())
        assert listing.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)


async def _services(channel: grpc.aio.Channel, metadata: Metadata) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10):
        names |= {s.name for s in reply.list_services_response.service}
    return names


async def test_tenant_reaches_job_and_cap_is_per_tenant(
    stack: Stack, pki: Pki, tls_router: Router
) -> None:
    """alpha's open stream is a Job of tenant alpha; alpha's 2nd call is refused, beta's served."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        long = chat(max_tokens=3000, ignore_eos=True)
        held = stub.Chat(long, metadata=bearer("alpha"), timeout=300)
        started = await anext(aiter(held))
        redis = connect(SharedSettings(redis_url=stack.redis_url))
        try:  # the shared NORMAL stream or, placed, the worker's own
            streams = await redis.keys(f"{stack.key_prefix}:jobs*")
            entries = [e for s in streams for e in await redis.xrange(s)]
        finally:
            await redis.aclose()
        tenants = {
            job.request_id: job.tenant for _, fields in entries if (job := decode(Job, fields))
        }
        assert tenants[started.started.request_id] == "alpha"
        for tenant in ("alpha", "alpha-2"):  # one tenant, two keys: one quota
            refused = await status_of(stub, chat(max_tokens=2), metadata=bearer(tenant))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        served = await collect(stub, chat(max_tokens=4), metadata=bearer("beta"))
        assert served.kinds()[-1] == "usage"
        held.cancel()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_abort_is_honoured_only_for_the_requests_tenant(
    stack: Stack, pki: Pki, tls_router: Router
) -> None:
    """beta's Abort of alpha's request finds nothing and the stream goes on, also in the
    engine (workers honour only alpha's abort marker); alpha's other key aborts it."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        call = stub.Chat(chat(max_tokens=3000, ignore_eos=True), metadata=bearer("alpha"))
        events = aiter(call)
        request_id = (await anext(events)).started.request_id
        abort = pb.AbortRequest(request_id=request_id)
        assert not (await stub.Abort(abort, metadata=bearer("beta"), timeout=10)).found
        await asyncio.sleep(2)  # a worker audit reads the markers once a second
        tokens = 0
        while tokens < 32:
            event = await anext(events)
            assert event.HasField("delta"), event
            tokens += len(event.delta.token_ids)
        assert (await stub.Abort(abort, metadata=bearer("alpha-2"), timeout=10)).found
        rest = [event async for event in events]
    finished = [e.finished for e in rest if e.HasField("finished")]
    assert [f.reason for f in finished] == [pb.FINISH_REASON_ABORT]
    assert rest[-1].HasField("usage")
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


async def test_oversized_request_is_refused_by_grpc(pki: Pki, tls_router: Router) -> None:
    """A request over max_message_bytes (64 KiB here) → RESOURCE_EXHAUSTED; serving goes on."""
    _, target = tls_router
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        exc = await status_of(stub, chat("x" * 100_000, max_tokens=2), metadata=bearer("beta"))
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer("beta"))
        assert info.live_workers >= 1


async def test_mtls_needs_a_client_certificate_of_the_ca(pki: Pki, mtls_router: Router) -> None:
    """No certificate or one of another CA: the handshake fails; the CA's client is served."""
    _, target = mtls_router
    for client in (None, "rogue"):
        async with grpc.aio.secure_channel(target, tls(pki, client)) as channel:
            info = serve_pb2_grpc.InferenceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=bearer("beta"), timeout=10
            )
            assert await code(info) == grpc.StatusCode.UNAVAILABLE, client
    async with grpc.aio.secure_channel(target, tls(pki, "client")) as channel:
        served = await collect(
            serve_pb2_grpc.InferenceStub(channel), chat(max_tokens=4), metadata=bearer("beta")
        )
        assert served.kinds()[0] == "started" and served.kinds()[-1] == "usage"


async def test_auth_health_puts_health_and_reflection_behind_keys(
    pki: Pki, mtls_router: Router
) -> None:
    """With --auth-health: Check, Watch and reflection need a key; with one they work."""
    _, target = mtls_router
    async with grpc.aio.secure_channel(target, tls(pki, "client")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        assert await code(health.Check(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as watch:
            async for _ in health.Watch(request, timeout=10):
                raise AssertionError("Watch served without a key")
        assert watch.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await _services(channel, ())
        assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await health.Check(request, metadata=bearer("alpha"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert INFERENCE in await _services(channel, bearer("alpha"))


async def test_logs_hold_no_keys_or_prompts(stack: Stack, pki: Pki, tls_router: Router) -> None:
    """After served, refused and unauthenticated calls, no log holds a key or the prompt."""
    proc, target = tls_router
    prompt = "sentinel-" + security.new_key()
    async with grpc.aio.secure_channel(target, tls(pki)) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)
        served = await collect(stub, chat(prompt, max_tokens=4), metadata=bearer("alpha"))
        started = served.of("started")[0].started
        wrong = (("authorization", f"Bearer {prompt}"),)
        refused = await status_of(stub, chat(prompt), metadata=wrong)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        bad = chat(prompt, max_tokens=2, temperature=-1.0)
        assert (await status_of(stub, bad, metadata=bearer("beta"))).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0
    router_log = proc.log_path.read_text()
    assert "API keys on: 2 tenants" in router_log and "TLS on" in router_log
    assert "API keys are OFF" in (stack.log_dir / "router.log").read_text()
    logs = [p for p in stack.log_dir.glob("*.log") if not p.name.startswith("redis")]
    assert proc.log_path in logs and stack.log_dir / "worker.log" in logs
    secrets_ = [prompt, *KEYS.values(), security.digest(KEYS["alpha"]).hex()]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [s for s in secrets_ if s in text], log.name
    assert re.fullmatch(r"req_[A-Za-z0-9_-]{22}", started.request_id)
