"""One request's channel in the router: what it accepts from the reply stream (fencing).

Every attempt of a request has an epoch (``Job.attempt``). A channel accepts
replies of its current attempt only, and within it only from the worker whose
reply came first (the attempt's lease allows one, and the first reply wins
if Redis ever lost the lease); it drops a reply whose sequence number it has
seen, and takes a gap in the numbers, or the attempt's end without a terminal
event, as a lost attempt that the dispatcher continues elsewhere. All of it
is checked in memory: fencing costs no Redis call per token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import EventQueue
from qwen_serve.queue.codec import Job, Reply


class Verdict(enum.Enum):
    """What the channel made of one reply."""

    DELIVERED = "delivered"
    STALE = "stale"  # another attempt's or another worker's: dropped (and fenced again)
    REPEATED = "repeated"  # already seen: dropped
    LOST = "lost"  # the current attempt ends without its terminal event: continue it


def is_terminal(event: pb.ChatEvent) -> bool:
    """Usage and Error are the last event of a stream."""
    return event.WhichOneof("event") in ("usage", "error")


@dataclass
class Channel:
    """Events of one request on their way from the reader to the servicer.

    It remembers what a continuation needs if the attempt is lost: the job, the
    tokens of choice 0 delivered so far, and the workers lost.
    """

    job: Job
    events: EventQueue = field(default_factory=EventQueue)
    entry_id: bytes = b""
    """The job-stream entry of the current attempt (known once written)."""
    mark: int = 0
    """The router's write mark of that entry (RouterQueue.submit)."""
    placed_on: str = ""
    """The worker whose own stream holds the entry, until a worker's reply arrives."""
    placed_at: float = 0.0
    """When it was placed there (monotonic seconds)."""
    worker_id: str = ""
    """The worker streaming the current attempt; empty until its first reply."""
    seq: int = 0
    started: bool = False
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    output: bool = False
    """Some output (a Delta) reached the client."""
    losses: int = 0
    """Attempts lost after their output began (limited by max_attempts)."""
    lost_workers: set[str] = field(default_factory=set)
    closed: bool = False
    """A terminal event was queued: nothing more goes to the client."""

    @property
    def attempt(self) -> int:
        """The current attempt (epoch)."""
        return self.job.attempt

    def accept(self, reply: Reply) -> Verdict:
        """Judge one reply and queue its events if they belong to the current attempt."""
        if self.closed:
            return Verdict.STALE
        if not reply.HasField("attempt"):
            return self._accept_unfenced(reply)
        if reply.attempt != self.attempt:
            return Verdict.STALE
        if self.worker_id and reply.worker_id != self.worker_id:
            return Verdict.STALE
        if reply.attempt_lost:
            return Verdict.LOST
        if reply.seq:
            if reply.seq <= self.seq:
                return Verdict.REPEATED
            if reply.seq > self.seq + 1:
                return Verdict.LOST  # output was lost (Redis lost writes): continue after it
            self.seq = reply.seq
        self.worker_id = reply.worker_id
        self._deliver(reply)
        return Verdict.DELIVERED

    def _accept_unfenced(self, reply: Reply) -> Verdict:
        """Replies of workers older than fencing: drop lost workers' only."""
        if reply.worker_id in self.lost_workers:
            return Verdict.STALE
        self.worker_id = reply.worker_id  # an event-less one names a lost worker
        self._deliver(reply)
        return Verdict.DELIVERED

    def _deliver(self, reply: Reply) -> None:
        for event in reply.events:
            kind = event.WhichOneof("event")
            if kind == "started":
                if self.started:
                    continue
                self.started = True
            elif kind == "delta":
                self.output = True
                self.completion_tokens += len(event.delta.token_ids)
                if event.delta.index == 0:
                    self.token_ids.extend(event.delta.token_ids)
            self.put(event)

    def put(self, event: pb.ChatEvent) -> None:
        """Queue an event for the client (nothing after a terminal one)."""
        if self.closed:
            return
        self.closed = is_terminal(event)
        self.events.put(event)

    def next_attempt(self, job: Job) -> None:
        """Move to ``job``, the continuation of the current attempt."""
        if self.worker_id:
            self.lost_workers.add(self.worker_id)
        self.job, self.worker_id, self.seq, self.entry_id, self.mark = job, "", 0, b"", 0

    def end_aborted(self) -> None:
        """End the stream as aborted: Finished (abort) per choice and Usage so far."""
        request = self.job.chat if self.job.HasField("chat") else self.job.generate
        choices = request.sampling.n if request.sampling.HasField("n") else 1
        for index in range(max(1, choices)):
            finished = pb.Finished(index=index, reason=pb.FINISH_REASON_ABORT)
            self.put(pb.ChatEvent(finished=finished))
        self.put(pb.ChatEvent(usage=pb.Usage(completion_tokens=self.completion_tokens)))
