"""The queue on Redis: the only package importing Redis, split by side.

- :mod:`qwen_serve.queue.connection`: clients (URL or Sentinel, ACL user, TLS),
  :class:`QueueUnavailable`;
- :mod:`qwen_serve.queue.router_queue`: submit jobs, read replies, abort, fence;
- :mod:`qwen_serve.queue.worker_queue`: claims, leases, replies, aborts, heartbeats;
- :mod:`qwen_serve.queue.acl`: the least-privilege ACL rules of each side.

Jobs go on one stream read by a consumer group of workers; each router has
its own reply stream; aborts are a pub/sub broadcast plus a short-lived
marker key; heartbeats are sorted-set scores plus a status value; leases
say which worker runs which attempt of a request.
"""

from __future__ import annotations

from qwen_serve.queue.base import QueueBase
from qwen_serve.queue.connection import QueueUnavailable, connect, now_ms
from qwen_serve.queue.keys import Keys
from qwen_serve.queue.router_queue import RouterQueue
from qwen_serve.queue.worker_queue import AttemptRef, LeaseCheck, WorkerQueue
from qwen_serve.settings import SharedSettings

__all__ = [
    "AttemptRef",
    "LeaseCheck",
    "QueueBase",
    "QueueUnavailable",
    "RouterQueue",
    "WorkerQueue",
    "connect",
    "now_ms",
    "router_queue",
    "worker_queue",
]


def router_queue(settings: SharedSettings, router_id: str) -> RouterQueue:
    """A RouterQueue connected per ``settings``."""
    return RouterQueue(
        connect(settings, block_ms=1000),
        Keys(settings.key_prefix),
        router_id,
        settings.heartbeat_ttl_s,
    )


def worker_queue(settings: SharedSettings, worker_id: str, block_ms: int) -> WorkerQueue:
    """A WorkerQueue connected per ``settings``."""
    return WorkerQueue(
        connect(settings, block_ms=block_ms),
        Keys(settings.key_prefix),
        worker_id,
        settings.heartbeat_ttl_s,
        settings.redis_outage_s,
    )
