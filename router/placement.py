"""Prefix-aware placement: which worker's job stream a new job goes to.

A multi-turn chat or an agent's tool loop sends the same leading messages again and
again; the worker that served the earlier turns holds their prefix in its engine's
cache (for Qwen3.5, a hybrid model, also the recurrent state at that prefix). So the
router hashes what a request starts with (:func:`prefix_key`) and ranks the live
workers by rendezvous hashing of that key: the same conversation ranks the same
worker first for as long as it lives, and a worker joining or leaving moves only the
keys it wins or held.

The first-ranked worker is taken only while its load stays within ``bound`` times the
fleet's average (bounded-load consistent hashing; below ``LOAD_FLOOR`` jobs always),
and never beyond its capacity;
otherwise the next one; if every worker is at its bound, the shared stream. A router
remembers where each recent key went and tries that worker first: a conversation the
bound once sent off its first rank keeps its cache where it began. A placed
job its worker has not claimed within ``placement_wait_s`` (or claimed and not
started within ``STARTED_WITHIN_S``), or whose worker's heartbeat stops, is written to
the shared stream by the router (the dispatcher's monitor), so nothing waits on a busy
or dead worker; the attempt's lease keeps a job that ends up in two streams from
running twice.

Only NORMAL (and unset) priority first attempts are placed: HIGH jobs go where a slot
is free soonest (their own stream), LOW jobs queue behind everything, and a
continuation after a worker's loss goes to the shared stream.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.codec import Job, WorkerStatus, job_priority
from qwen_serve.settings import RouterSettings
from router import observability
from router.channels import Channel

LEADING_MESSAGES = 2
"""A conversation's first messages (the system prompt and the first user turn, as a
rule) name it: they stay the same while its history grows."""
LEADING_TOKENS = 256
STARTED_WITHIN_S = 15.0
"""A placed job its worker claimed but has not started after this long is moved (the
workers' own reclaim_unstarted_s for the shared streams)."""
LEADING_CHARS = 1024
IMAGE_HEAD_BYTES = 4096
LOAD_FLOOR = 3
"""A worker below this load is never over the bound: at a low load, a heartbeat's
running count a second old would otherwise send conversations away for nothing."""
REMEMBERED_KEYS = 100_000
"""Keys whose last worker a router remembers (about 10 MB)."""


def prefix_key(job: Job) -> bytes | None:
    """What a job's prompt starts with, hashed; None for a job that is not placed."""
    if job_priority(job) not in (pb.PRIORITY_UNSPECIFIED, pb.PRIORITY_NORMAL):
        return None
    if job.attempt or job.continuation_token_ids:
        return None
    digest = hashlib.blake2b(digest_size=16)
    kind = job.WhichOneof("request")
    if kind == "chat":
        for message in job.chat.messages[:LEADING_MESSAGES]:
            _add_message(digest, message)
    elif kind == "generate" and job.generate.HasField("token_ids"):
        ids = job.generate.token_ids.ids[:LEADING_TOKENS]
        digest.update(b"ids:" + b",".join(str(i).encode() for i in ids))
    elif kind == "generate":
        digest.update(b"text:" + job.generate.text[:LEADING_CHARS].encode())
    else:
        return None
    return digest.digest()


def _add_message(digest: Any, message: pb.Message) -> None:
    """A message's role and parts into ``digest``; an image by its size and first bytes
    (hashing megabytes on the router's loop would stall it; an image's head and size
    tell conversations apart)."""
    digest.update(b"role:%d" % message.role)
    for part in message.content:
        if part.HasField("image"):
            image = part.image
            head = image.data[:IMAGE_HEAD_BYTES] or image.url[:IMAGE_HEAD_BYTES].encode()
            size = len(image.data) or len(image.url)
            digest.update(b"image:%d:" % size + head)
        else:
            digest.update(b"text:" + part.text.encode())


def rank(key: bytes, worker_ids: Sequence[str]) -> list[str]:
    """Worker ids by rendezvous score for ``key``, best first."""

    def score(worker_id: str) -> bytes:
        return hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()

    return sorted(worker_ids, key=score, reverse=True)


def choose(
    key: bytes,
    workers: Sequence[WorkerStatus],
    loads: Mapping[str, int],
    bound: float,
    prefer: str = "",
) -> str | None:
    """The worker a job with ``key`` goes to, or None for the shared stream.

    ``loads``: each worker's open requests as the router knows them (a worker missing
    counts its heartbeat's ``running``). ``prefer``: the worker this key went to last
    (it holds the prefix even if the bound once sent it off its first rank).
    """
    ready = {w.worker_id: w for w in workers if w.capacity > 0 and not w.draining}
    if not ready:
        return None

    def load(worker_id: str) -> int:
        return loads.get(worker_id, ready[worker_id].running)

    total = sum(load(w) for w in ready) + 1  # with this job
    limit = max(math.ceil(bound * total / len(ready)), LOAD_FLOOR)
    ranked = rank(key, list(ready))
    if prefer in ready:
        ranked.remove(prefer)
        ranked.insert(0, prefer)
    for worker_id in ranked:
        if load(worker_id) < min(limit, ready[worker_id].capacity):
            return worker_id
    return None


class Placer:
    """One router's placement: where each new job goes, and which placed jobs wait too
    long (moved to the shared stream by the dispatcher).

    A worker's load is this router's open requests placed on it, counted exactly as
    they start and end, plus the rest of what the worker's last heartbeat showed
    running (other routers' requests, unplaced ones): heartbeats alone are a second
    old, and short requests would look like load long after they ended.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.open: dict[str, set[str]] = {}
        """Request ids of this router's open streams placed on each worker."""
        self.others: dict[str, int] = {}
        """Per worker: what its last heartbeat showed running beyond ``open``."""
        self.last: OrderedDict[bytes, str] = OrderedDict()
        """The worker each recent key went to (at most ``REMEMBERED_KEYS``)."""

    def loads(self, workers: Sequence[WorkerStatus]) -> dict[str, int]:
        """Each worker's load as this router knows it."""
        return {
            w.worker_id: len(self.open.get(w.worker_id, ())) + self.others.get(w.worker_id, 0)
            for w in workers
        }

    def place(self, channel: Channel, workers: Sequence[WorkerStatus]) -> str:
        """The worker whose own stream ``channel``'s job goes to; "" for the shared stream."""
        key = prefix_key(channel.job) if self.settings.placement else None
        if key is None:
            observability.placement("shared")
            return ""
        prefer = self.last.get(key, "")
        loads = self.loads(workers)
        worker = choose(key, workers, loads, self.settings.placement_bound, prefer)
        observability.placement("placed" if worker else "shared")
        if not worker:
            return ""
        self._remember(key, worker)
        self.open.setdefault(worker, set()).add(channel.job.request_id)
        channel.placed_on, channel.placed_at = worker, time.monotonic()
        return worker

    def _remember(self, key: bytes, worker: str) -> None:
        self.last[key] = worker
        self.last.move_to_end(key)
        if len(self.last) > REMEMBERED_KEYS:
            self.last.popitem(last=False)

    def refreshed(self, workers: Sequence[WorkerStatus]) -> None:
        """The workers' heartbeats were read again: what they run beyond this router's
        placed requests is the others' load."""
        self.others = {
            w.worker_id: max(0, w.running - len(self.open.get(w.worker_id, ()))) for w in workers
        }
        live = {w.worker_id for w in workers}
        for gone in [w for w in self.open if w not in live and not self.open[w]]:
            del self.open[gone]

    def ended(self, channel: Channel) -> None:
        """A request's stream ended: it no longer loads the worker it was placed on."""
        self.open.get(channel.placed_on, set()).discard(channel.job.request_id)

    def overdue(self, channels: Iterable[Channel], live: set[str]) -> list[tuple[Channel, bool]]:
        """Placed jobs no worker has answered within ``placement_wait_s``, or whose worker
        is gone: (channel, whether the worker is gone). The dispatcher moves a gone
        worker's job, an unclaimed one, and one claimed but not started within
        ``STARTED_WITHIN_S`` (:meth:`moved` then)."""
        now, out = time.monotonic(), []
        for channel in channels:
            if not channel.placed_on or channel.worker_id or not channel.entry_id:
                continue
            gone = channel.placed_on not in live
            if gone or now - channel.placed_at > self.settings.placement_wait_s:
                out.append((channel, gone))
        return out

    def stalled(self, channel: Channel) -> bool:
        """Claimed by its worker long ago and still not started there."""
        return time.monotonic() - channel.placed_at > STARTED_WITHIN_S

    def moved(self, channel: Channel) -> None:
        """The job is being written to the shared stream: no longer placed."""
        self.ended(channel)
        channel.placed_on = ""
