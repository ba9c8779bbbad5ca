"""Continuing streams whose attempt was lost, and reconciling after a Redis outage.

An attempt is lost when its worker's heartbeat stops, when the worker (or a
worker sweeping for it) says so, when its output has a gap, or when Redis
lost its job or its end (a failover to a replica that missed the last
writes). The stream is then continued on another worker with the tokens its
client already has (``Job.continuation_token_ids``), as a new attempt that
fences the old one: the old attempt's lease becomes a tombstone, so a worker
still running it stops, and its replies are dropped here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import UNAVAILABLE, RequestError
from qwen_serve.queue.broker import QueueUnavailable
from qwen_serve.queue.codec import Reply
from qwen_serve.queue.router_queue import stream_position
from router import jobs
from router.channels import Channel

if TYPE_CHECKING:
    from router.dispatcher import Dispatcher

logger = logging.getLogger(__name__)


class StreamRecovery:
    """What one router does about lost attempts."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.reconcile_needed = False
        self._refenced: set[tuple[str, int, str]] = set()

    def continue_elsewhere(self, channel: Channel, why: str) -> None:
        """Continue the channel's request on another worker, or end it clearly.

        An attempt lost before any output is simply run again (any n); one lost
        after output began is continued after it (n = 1 only), at most
        ``max_attempts - 1`` times.
        """
        if channel.closed:
            return
        dispatcher, job = self.dispatcher, channel.job
        if channel.output:
            channel.losses += 1
        allowed = channel.losses < dispatcher.settings.max_attempts
        if allowed and (not channel.output or jobs.can_continue(job)):
            channel.next_attempt(jobs.continuation_job(job, channel.token_ids))
            logger.warning(
                "%s: continuing %s after %d tokens (attempt %d)",
                why,
                job.request_id,
                len(channel.token_ids),
                channel.attempt,
            )
            dispatcher.tasks.spawn(self._resubmit(channel, (job.request_id, job.attempt)))
        else:
            message = f"{why}, and the stream cannot be continued"
            error = pb.Error(code=UNAVAILABLE, message=message, retryable=True)
            channel.put(pb.ChatEvent(error=error))

    async def _resubmit(self, channel: Channel, fence: tuple[str, int]) -> None:
        job = channel.job
        try:
            entry_id, mark = await self.dispatcher.submit(job, fence)
        except RequestError as exc:
            error = pb.Error(code=exc.code, message=exc.message, retryable=True)
            channel.put(pb.ChatEvent(error=error))
            return
        if channel.job is job:
            channel.entry_id, channel.mark = entry_id, mark

    def recover_orphans(self, live: set[str]) -> None:
        """Continue elsewhere, or end, streams whose worker's heartbeat has stopped."""
        for channel in list(self.dispatcher.channels.values()):
            if channel.worker_id and channel.worker_id not in live:
                self.continue_elsewhere(channel, f"worker {channel.worker_id} lost")

    def refence(self, channel: Channel, reply: Reply) -> None:
        """A worker still streams a replaced attempt: fence that attempt again (once).

        Its lease's tombstone may have been lost with a Redis failover.
        """
        if not reply.HasField("attempt") or reply.attempt >= channel.attempt:
            return  # the current attempt: its lease decides between its workers
        mark = (reply.request_id, reply.attempt, reply.worker_id)
        if mark in self._refenced:
            return
        self._refenced.add(mark)
        self.dispatcher.tasks.spawn(self._fence(reply.request_id, reply.attempt))

    async def _fence(self, request_id: str, attempt: int) -> None:
        try:
            await self.dispatcher.queue.fence([(request_id, attempt)])
        except QueueUnavailable as exc:
            logger.warning("could not fence attempt %d of %s: %s", attempt, request_id, exc)

    async def reconcile(
        self, last_id: bytes, read_once: Callable[[bytes], Awaitable[bytes]]
    ) -> bytes:
        """After an outage: find what Redis lost, and continue those streams.

        If the reply stream went back (entries lost), it is read again from the start
        (sequence numbers drop what was delivered). An attempt with no lease and no
        pending entry was lost, unless its job still waits in the queue (not yet
        delivered, and covered by a write mark that survived) or its end arrives in
        the read that follows the check. A done lease needs nothing: its last events
        were written before it, in the same round trip.
        """
        queue = self.dispatcher.queue
        newest = await queue.last_reply_id()
        if newest is None or stream_position(newest) < stream_position(last_id):
            logger.warning("the reply stream lost entries; reading it again from the start")
            last_id = b"0-0"
        mark = await queue.surviving_mark()
        channels = [c for c in self.dispatcher.channels.values() if c.entry_id and not c.closed]
        undelivered = await queue.undelivered([c.entry_id for c in channels])
        states = await queue.attempt_states(
            [(c.job.request_id, c.attempt, c.entry_id) for c in channels]
        )
        suspects = []
        for channel, (lease, pending), waits in zip(channels, states, undelivered, strict=True):
            queued = waits and channel.mark <= mark
            if lease is None and not pending and not queued:
                suspects.append((channel, channel.attempt))
        last_id = await read_once(last_id)
        self.reconcile_needed = False
        for channel, attempt in suspects:
            if not channel.closed and channel.attempt == attempt:
                self.continue_elsewhere(channel, "Redis lost its job or its state")
        return last_id
