"""One attempt of a job on this worker, from claim to acknowledgement."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.queue.broker import AttemptRef
from qwen_serve.queue.codec import Job


@dataclass
class Run:
    """A claimed job and what the worker knows about its attempt.

    ``leased``: this worker holds the attempt's lease, so it may stream it.
    ``lost``: the attempt is no longer this worker's (its lease went to someone
    else or a router fenced it, or the worker gave up during a Redis outage):
    nothing more of it is sent. ``keep_entry``: leave the job pending (it will be
    run again) instead of acknowledging it. ``hand_back_to``: give the pending
    entry to the worker whose lease runs it.
    """

    entry_id: bytes
    job: Job
    task: asyncio.Task[None] | None = None
    leased: bool = False
    lost: bool = False
    aborted: bool = False
    keep_entry: bool = False
    hand_back_to: str = ""

    @property
    def request_id(self) -> str:
        """The request's id (the same for every attempt)."""
        return self.job.request_id

    @property
    def attempt(self) -> int:
        """The attempt (epoch) this run is."""
        return self.job.attempt

    @property
    def key(self) -> tuple[str, int]:
        """(request id, attempt): what replies and leases are keyed by."""
        return (self.job.request_id, self.job.attempt)

    @property
    def engine_id(self) -> str:
        """The engine's request id: unique per attempt, so two attempts of one request
        on this worker (a fenced one and its continuation) never share one."""
        rid = self.job.request_id
        return rid if not self.job.attempt else f"{rid}.{self.job.attempt}"

    @property
    def ref(self) -> AttemptRef:
        """What the lease and abort keys of this attempt need."""
        return AttemptRef(self.job.request_id, self.job.attempt, self.job.tenant, self.entry_id)


def aborted_events(job: Job) -> list[pb.ChatEvent]:
    """The end of a stream aborted before it started: Finished (abort) per choice, Usage."""
    request = job.chat if job.HasField("chat") else job.generate
    choices = request.sampling.n if request.sampling.HasField("n") else 1
    finished = [
        pb.ChatEvent(finished=pb.Finished(index=i, reason=pb.FINISH_REASON_ABORT))
        for i in range(max(1, choices))
    ]
    return [*finished, pb.ChatEvent(usage=pb.Usage())]
