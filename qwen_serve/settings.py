"""Typed settings for the router and the worker, read once at start-up.

Values come from flags (derived from these models by ``qwen_serve.flags``) and from
environment variables with the ``QS_`` prefix; ``REDIS_URL`` is read as is.
Nothing here is read at import time.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def new_id(prefix: str) -> str:
    """An unguessable id such as ``router-3kq...``."""
    return f"{prefix}-{secrets.token_hex(6)}"


class SharedSettings(BaseSettings):
    """What the router and the worker share: the queue (Redis), heartbeats, outages and
    observability."""

    model_config = SettingsConfigDict(env_prefix="QS_", extra="ignore", populate_by_name=True)

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "QS_REDIS_URL"),
        description="Redis URL: redis://, rediss://, unix://, or Sentinel as "
        "redis+sentinel://[user:password@]host:port[,host:port...]/service[/db] "
        "(rediss+sentinel:// for TLS).",
    )
    redis_sentinel_username: str | None = Field(
        default=None, description="ACL user of the Sentinels (when they require one)."
    )
    redis_sentinel_password: str | None = Field(
        default=None, description="Password of the Sentinels (when they require one)."
    )
    redis_outage_s: float = Field(
        default=10.0,
        gt=0,
        description="Redis outages (restart, failover, pause) up to this long are ridden out: "
        "streams wait and continue, new requests wait. Longer ones end open streams with a "
        "retryable UNAVAILABLE.",
    )
    key_prefix: str = Field(default="qs", description="Prefix of every Redis key.")
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="Heartbeat period.")
    heartbeat_ttl_s: float = Field(
        default=5.0, gt=0, description="A heartbeat older than this means the process is gone."
    )
    redis_tls_ca_file: str | None = Field(
        default=None, description="CA bundle that signs Redis's certificate (rediss:// only)."
    )
    redis_tls_cert_file: str | None = Field(
        default=None, description="Client certificate for Redis (when it sets tls-auth-clients)."
    )
    redis_tls_key_file: str | None = Field(default=None, description="Key of redis_tls_cert_file.")
    # Observability (shared too; tracing itself reads the standard OTEL_* variables).
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of the Prometheus /metrics endpoint; unset: none.",
    )
    metrics_host: str = Field(
        default="0.0.0.0",
        description="Address the /metrics endpoint binds: 0.0.0.0 (every IPv4 interface, for "
        "a scraper in another pod), 127.0.0.1 (this host only), :: (IPv6) or one address.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines: human-readable text, or JSON with request/trace ids.",
    )
    trace_content: bool = Field(
        default=False,
        description="Record prompt and output text on spans (off: only counts and attributes).",
    )


class RouterSettings(SharedSettings):
    """Settings of one router process."""

    router_id: str = Field(default_factory=lambda: new_id("router"))
    listen: str = Field(default="[::]:50051", description="gRPC listen address.")
    max_inflight: int = Field(
        default=1024, ge=1, description="Requests this router streams at once; more are refused."
    )
    max_inflight_per_tenant: int = Field(
        default=256, ge=1, description="Streams one tenant may have open on this router."
    )
    max_queue_depth: int = Field(
        default=4096, ge=0, description="Unclaimed jobs in Redis above which requests are refused."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Workers one stream may be continued on after losses."
    )
    abort_grace_s: float = Field(
        default=1.0,
        ge=0,
        description="After Abort, how long to wait for the running worker's own end of the "
        "stream (with exact usage) before ending it here.",
    )
    placement: bool = Field(
        default=True,
        description="Send NORMAL jobs to the worker most likely to hold their prompt's "
        "prefix in its cache (router/placement.py); off: every job to the shared streams.",
    )
    placement_bound: float = Field(
        default=1.25,
        ge=1.0,
        description="A worker takes placed jobs while its load is at most this many times "
        "the fleet's average (and below its capacity); beyond, the next worker in the "
        "job's ranking, or the shared stream.",
    )
    placement_wait_s: float = Field(
        default=2.0,
        gt=0,
        description="A placed job no worker has started after this long (or whose worker's "
        "heartbeat stopped) is moved to the shared stream.",
    )
    submit_batch_max: int = Field(default=256, ge=1, description="Jobs per pipelined write.")
    retry_after_ms: int = Field(default=500, ge=1, description="Retry hint when overloaded.")
    drain_grace_s: float = Field(default=30.0, ge=0, description="Time to finish streams on stop.")
    max_message_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request message accepted."
    )
    tls_cert_file: str | None = Field(default=None, description="Server certificate (PEM).")
    tls_key_file: str | None = Field(default=None, description="Key of tls_cert_file (PEM).")
    tls_client_ca_file: str | None = Field(
        default=None, description="CA of client certificates; set, every client needs one (mTLS)."
    )
    api_keys_file: str | None = Field(
        default=None,
        description="Lines 'tenant:key' or 'tenant:sha256:<hex>'; set, every Inference call "
        "needs 'authorization: Bearer <key>'. Unset, auth is off (dev default).",
    )
    tenant_limits_file: str | None = Field(
        default=None,
        description="Lines 'tenant inflight=N rpm=N tpm=N' ('*': every other tenant), held "
        "in Redis and exact across routers (router/quotas.py). Unset: no tenant limits "
        "beyond max_inflight_per_tenant.",
    )
    auth_health: bool = Field(
        default=False, description="Require an API key for health and reflection too."
    )
    health_listen: str | None = Field(
        default=None,
        description="Extra plaintext address serving only grpc.health.v1, e.g. [::]:8081 "
        "(kubelet gRPC probes speak no TLS).",
    )
    http_listen: str | None = Field(
        default=None,
        description="Address of the OpenAI-compatible HTTP API, e.g. [::]:8000 (TLS and API "
        "keys as on the gRPC port). Unset: no HTTP listener.",
    )


class WorkerSettings(SharedSettings):
    """Settings of one worker process."""

    worker_id: str = Field(default_factory=lambda: new_id("worker"))
    profile: str = Field(
        default="cpu-tiny", description="Engine profile: cpu-tiny, rocm-tp4 or nvidia."
    )
    model: str | None = Field(default=None, description="Model path; the profile's by default.")
    served_model_name: str | None = Field(default=None, description="Name clients send.")
    capacity: int | None = Field(
        default=None, ge=1, description="Requests run at once: the engine's max_num_seqs."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length (prompt plus output tokens)."
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="GPUs one engine spans (tensor parallelism)."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32", "half", "float"] | None = Field(
        default=None, description="Weights and activations dtype (the CPU engine needs bfloat16)."
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Share of each GPU's memory the engine takes."
    )
    enforce_eager: bool | None = Field(
        default=None, description="Eager mode: no torch.compile and no CUDA/HIP graphs."
    )
    mtp_tokens: int | None = Field(
        default=None, ge=0, description="MTP speculative tokens; 0 turns it off."
    )
    kv_cache_gib: float | None = Field(default=None, gt=0, description="CPU KV cache size (GiB).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any further vLLM AsyncEngineArgs fields, applied last; QS_ENGINE_ARGS "
        "takes a JSON object. Checked against vLLM's fields and types at start.",
    )
    structured_output_in_reasoning: bool | None = Field(
        default=None,
        description="Constrain reasoning too (vLLM enable_in_reasoning); unset: the profile's "
        "(off: constraints apply after </think>). Tests use it to spell reasoning with a regex.",
    )
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="Largest encoded image accepted (bytes)."
    )
    max_image_pixels: int = Field(
        default=7680 * 4320, ge=1, description="Largest image decoded (width x height)."
    )
    image_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs are fetched (comma-separated; "
        "'*.example.com' covers subdomains). Empty: remote image URLs are refused.",
    )
    image_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Time limit of one remote image fetch."
    )
    drain_grace_s: float = Field(default=30.0, ge=0, description="Time to finish streams on stop.")
    claim_block_ms: int = Field(default=200, ge=1, description="Longest wait of one claim call.")
    high_priority_reserve: int = Field(
        default=1,
        ge=0,
        description="Engine slots kept for HIGH priority jobs while HIGH jobs are in use: "
        "NORMAL and LOW jobs are claimed only while more slots than this are free, so a "
        "HIGH job starts at once under a flood of others (the engine does not preempt for "
        "a free slot). Kept from a worker's first HIGH job until none has come for "
        "high_priority_reserve_hold_s, so a deployment without HIGH traffic runs every "
        "slot. At most the capacity less one; 0: none kept.",
    )
    high_priority_reserve_hold_s: float = Field(
        default=600.0,
        ge=0,
        description="How long after a worker's last HIGH job it keeps the HIGH slots free.",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="Deliveries of an unstarted job before it is dead-lettered."
    )
    reclaim_unstarted_s: float = Field(
        default=15.0,
        gt=0,
        description="A job a worker claimed but did not start within this long is taken over "
        "by another worker, whatever the first one's heartbeat says.",
    )
    status_file: str | None = Field(
        default=None,
        description="Where the worker writes its liveness for `python -m worker.probe`; "
        "unset: <tmp>/qwen-serve-workers/<worker_id>.json, one file per worker.",
    )
    coalesce_ms: float = Field(
        default=2.0,
        ge=0,
        description="Least time between two reply writes to Redis: under load, deltas"
        " gather this long; after a quiet spell the next write goes at once.",
    )

    @model_validator(mode="after")
    def _reclaim_after_heartbeats(self) -> WorkerSettings:
        if self.reclaim_unstarted_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                "reclaim_unstarted_s must be at least two heartbeat intervals "
                f"({2 * self.heartbeat_interval_s:g} s): running jobs are renewed once a heartbeat"
            )
        return self

    @field_validator("image_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value
