"""qwen_serve_client against the live stack (router → Redis → worker with the CPU engine).

API keys and TLS are tested twice: against an extra router with TLS and a key
file (real enforcement), and against a small in-process gRPC server that
records the metadata the client puts on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc
from qwen_serve_client import (
    AsyncClient,
    AuthError,
    Client,
    ConnectError,
    DeadlineExceeded,
    Delta,
    Finished,
    FinishReason,
    InvalidRequest,
    NotFound,
    Overloaded,
    RetryPolicy,
    Started,
    StreamFailed,
    Usage,
    tool_from_function,
    tool_result,
    user,
)
from qwen_serve_dev import devstack
from tests.client_helpers import FORCED_CALL_REGEX, PROMPT, TOOL_CALL_TOKEN_ID, run_cli
from tests.conftest import Stack
from tests.support.calls import wait_engines_idle
from tests.support.images import png

e2e = pytest.mark.e2e


def get_weather(city: str) -> dict[str, Any]:
    """Current weather for a city.

    Args:
        city: City name.
    """
    return {"city": city, "sky": "sunny", "temperature_c": 21}


FORCED = {"think": False, "regex": FORCED_CALL_REGEX, "max_tokens": 64, "temperature": 0.0}


@e2e
async def test_image_and_tool_call_stream_then_tool_result(stack: Stack) -> None:
    tools = [tool_from_function(get_weather)]
    picture = Image.open(io.BytesIO(png()))
    async with AsyncClient(stack.target) as client:
        stream = client.chat([user(PROMPT, picture)], tools=tools, **FORCED)  # type: ignore[arg-type]
        events = [event async for event in stream]
        assert isinstance(events[0], Started) and isinstance(events[-1], Usage)
        deltas = [e for e in events if isinstance(e, Delta)]
        assert deltas[0].token_ids[0] == TOOL_CALL_TOKEN_ID  # the tag as one token: parsed
        fragments = [f for d in deltas for f in d.tool_calls]
        assert fragments[0].name == "get_weather" and fragments[0].id
        (finished,) = [e for e in events if isinstance(e, Finished)]
        assert (
            "".join(f.arguments_fragment for f in fragments)
            == finished.tool_calls[0].arguments_json
        )
        result = stream.result
        assert result.finish_reason == FinishReason.TOOL_CALLS
        assert [(c.name, c.arguments) for c in result.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert result.tool_calls[0].id == fragments[0].id and result.content == ""

        text_only = await client.chat(PROMPT, tools=tools, think=False, max_tokens=1).collect()
        assert result.usage and text_only.usage
        assert result.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image went along

        call = result.tool_calls[0]
        history = [user(PROMPT, picture), result.message(), tool_result(call, get_weather("Paris"))]
        follow_up = await client.chat(history, tools=tools, think=False, max_tokens=4).collect()
        assert follow_up.usage and follow_up.usage.completion_tokens > 0
        turn_tokens = result.usage.prompt_tokens + result.usage.completion_tokens
        assert follow_up.usage.prompt_tokens > turn_tokens  # assistant turn + tool result rendered


@e2e
def test_image_from_path_bytes_and_pil_are_the_same_prompt(stack: Stack, tmp_path: Path) -> None:
    data = png(64)
    path = tmp_path / "red.png"
    path.write_bytes(data)
    sources: list[Any] = [path, data, Image.open(io.BytesIO(data)), png(128)]
    with Client(stack.target) as client:
        counts = []
        for source in sources:
            result = client.chat(user("Describe", source), think=False, max_tokens=1).collect()
            assert result.usage is not None
            counts.append(result.usage.prompt_tokens)
    assert counts[0] == counts[1] == counts[2] < counts[3]


@e2e
def test_sync_client_reasoning_model_info_and_health(stack: Stack) -> None:
    with Client(stack.target) as client:
        result = client.chat("Think first.", think=True, max_tokens=8, temperature=0.0).collect()
        assert result.reasoning and result.usage and result.usage.reasoning_tokens > 0
        info = client.model_info()
        assert info.served_model_name == result.model and info.live_workers == 1
        assert client.health() == client.health("liveness") == "SERVING"
        generated = client.generate([10, 20, 30], max_tokens=3, ignore_eos=True).collect()
        assert len(generated.choice().token_ids) == 3
        stream = client.chat("go on", max_tokens=3000, ignore_eos=True)
        for event in stream:
            if isinstance(event, Delta):
                stream.cancel()  # iteration then ends quietly
        assert stream.result.usage is None and stream.result.request_id


@e2e
def test_errors_before_acceptance_are_typed(stack: Stack) -> None:
    with Client(stack.target) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.chat("hi", top_p=5.0).collect()
        assert invalid.value.field == "sampling.top_p"
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(NotFound, match="not served"):
            client.chat("hi", model="no-such-model").collect()


async def test_unreachable_router_is_a_connect_error() -> None:
    target = f"127.0.0.1:{devstack.free_port()}"
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    async with AsyncClient(target, retry=retry, timeout=30) as client:
        stream = client.chat("hi")
        with pytest.raises(ConnectError, match=target):
            await stream.collect()
        assert stream.attempts == 2  # retried: nothing had been accepted


@e2e
async def test_cancel_ends_iteration_and_frees_the_engine(stack: Stack) -> None:
    async with AsyncClient(stack.target) as client:
        stream = client.chat("go on", max_tokens=3000, ignore_eos=True)
        deltas = 0
        async for event in stream:
            deltas += isinstance(event, Delta)
            if deltas == 3:
                stream.cancel()
        assert deltas == 3 and stream.result.usage is None
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


@e2e
def test_abort_after_started_finishes_with_abort(stack: Stack) -> None:
    with Client(stack.target) as client:
        stream = client.chat("go on", max_tokens=3000, ignore_eos=True)
        for event in stream:
            if isinstance(event, Started):
                assert stream.abort()
        assert stream.result.finish_reason == FinishReason.ABORT
        assert stream.result.usage is not None


@e2e
async def test_deadline_raises_and_is_not_retried(stack: Stack) -> None:
    async with AsyncClient(stack.target) as client:
        stream = client.chat("go on", max_tokens=3000, ignore_eos=True, timeout=3.0)
        # The client's timer or the server's (the deadline travels with the job) ends it
        # first: a DEADLINE_EXCEEDED status, or an Error event with that status.
        with pytest.raises((DeadlineExceeded, StreamFailed)) as ended:
            await stream.collect()
        failed = ended.value
        assert (
            isinstance(failed, DeadlineExceeded) or failed.code == grpc.StatusCode.DEADLINE_EXCEEDED
        )
        assert stream.attempts == 1  # a deadline is final: never retried
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


@e2e
async def test_overloaded_call_is_retried_until_a_slot_frees(stack: Stack) -> None:
    proc, target = stack.router("--max-inflight", "1", name="router-client-retry")
    try:
        patient = RetryPolicy(max_attempts=50, max_backoff=0.2)
        async with (
            AsyncClient(target) as holder,
            AsyncClient(target, retry=RetryPolicy(max_attempts=1)) as impatient,
            AsyncClient(target, retry=patient) as waiter,
        ):
            long_call = holder.chat("hold the slot", max_tokens=3000, ignore_eos=True)
            assert isinstance(await anext(long_call), Started)
            with pytest.raises(Overloaded) as refused:
                await impatient.chat("hi", max_tokens=2).collect()
            assert refused.value.retry_after is not None and refused.value.retry_after > 0
            stream = waiter.chat("hi", max_tokens=2)
            task = asyncio.create_task(stream.collect())
            for _ in range(200):  # bounded: until the waiter has been refused once
                if stream.attempts >= 2:
                    break
                await asyncio.sleep(0.05)
            long_call.cancel()
            result = await task
        assert result.usage is not None and stream.attempts >= 2
    finally:
        proc.stop()
    assert await wait_engines_idle(stack.redis_url, stack.key_prefix) == 0


# ------------------------------------------------------------ API key and TLS


@dataclass
class ProbeServer:
    """An in-process Inference server that only answers GetModelInfo for key "secret"."""

    plain_target: str
    tls_target: str
    cert_pem: bytes
    seen: list[dict[str, str]] = field(default_factory=list)


class _KeyChecker(serve_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    def __init__(self, seen: list[dict[str, str]]) -> None:
        self.seen = seen

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        metadata = dict(context.invocation_metadata())
        self.seen.append(metadata)
        if metadata.get("authorization") != "Bearer secret":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        return pb.ModelInfo(served_model_name="key-probe")


def self_signed_cert() -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for "localhost", valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def probe() -> Iterator[ProbeServer]:
    """The key-checking server on a plain-text and a TLS port."""
    key_pem, cert_pem = self_signed_cert()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    seen: list[dict[str, str]] = []
    serve_pb2_grpc.add_InferenceServicer_to_server(_KeyChecker(seen), server)
    plain = server.add_insecure_port("127.0.0.1:0")
    secure = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)])
    )
    server.start()
    try:
        yield ProbeServer(f"127.0.0.1:{plain}", f"127.0.0.1:{secure}", cert_pem, seen)
    finally:
        server.stop(None)


def test_api_key_is_sent_as_bearer_metadata(
    probe: ProbeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(probe.plain_target, api_key="secret") as client:
        assert client.model_info().served_model_name == "key-probe"
    assert probe.seen[-1]["authorization"] == "Bearer secret"
    monkeypatch.setenv("QWEN_SERVE_API_KEY", "secret")
    with Client(probe.plain_target) as client:  # the environment's key
        assert client.model_info().served_model_name == "key-probe"
    monkeypatch.delenv("QWEN_SERVE_API_KEY")
    with Client(probe.plain_target) as client, pytest.raises(AuthError, match="API key"):
        client.model_info()
    assert "authorization" not in probe.seen[-1]


async def test_tls_with_given_roots_and_server_name(probe: ProbeServer, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(probe.cert_pem)
    options: dict[str, Any] = {"api_key": "secret", "server_name": "localhost"}
    async with AsyncClient(probe.tls_target, root_certificates=ca, **options) as client:
        assert (await client.model_info()).served_model_name == "key-probe"
    no_retry = RetryPolicy(max_attempts=1)
    async with AsyncClient(probe.tls_target, tls=True, retry=no_retry, **options) as client:
        with pytest.raises(ConnectError):  # the system roots do not trust the test CA
            await client.model_info()


def test_cli_auth_failure_is_clear(probe: ProbeServer) -> None:
    refused = run_cli("models", "--target", probe.plain_target)
    assert refused.returncode == 4
    assert refused.stderr.startswith("error: UNAUTHENTICATED: missing or unknown API key")
    assert "--api-key" in refused.stderr
    accepted = run_cli("models", "--target", probe.plain_target, "--api-key", "secret")
    assert accepted.returncode == 0 and "key-probe" in accepted.stdout


@e2e
def test_sdk_and_cli_against_a_router_with_tls_and_api_keys(stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("router.security", reason="the router has no TLS / API-key support here")
    key_pem, cert_pem = self_signed_cert()
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    secret = "qsk_client_test_key_0123456789"
    (tmp_path / "keys").write_text(f"client-tests:{secret}\n")
    port = devstack.free_port()
    proc = devstack.start_router(
        stack.redis_url, port, tmp_path, "--key-prefix", stack.key_prefix,
        "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
        "--api-keys-file", str(tmp_path / "keys"), name="router-tls-keys",
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    tls: dict[str, Any] = {"root_certificates": cert_pem, "server_name": "localhost"}
    try:
        with Client(target, api_key=secret, **tls) as client:
            for _ in range(240):  # bounded: until the router is up (health is open)
                with contextlib.suppress(ConnectError):
                    if client.health() == "SERVING":
                        break
                time.sleep(0.25)
            assert client.chat("hi", max_tokens=2).collect().usage is not None
        with Client(target, **tls) as client, pytest.raises(AuthError) as refused:
            client.chat("hi", max_tokens=2).collect()
        assert refused.value.field == "authorization"
        cli = ["--target", target, "--ca-cert", str(tmp_path / "cert.pem")]
        cli += ["--server-name", "localhost", "--max-tokens", "2"]
        assert run_cli("chat", "hi", *cli, "--api-key", secret).returncode == 0
        wrong = run_cli("chat", "hi", *cli, "--api-key", "qsk_not_the_right_key_at_all")
        assert wrong.returncode == 4 and "UNAUTHENTICATED" in wrong.stderr
    finally:
        proc.stop()
