"""The gateway's coalescing of requests into MPUBs: one MPUB per topic per IOLoop iteration.

Every ``/pub`` and ``/mpub`` that passed its checks in one IOLoop iteration,
on any connection, joins its topic's open batch; on the next iteration each
batch leaves as ONE MPUB. nsqd accepts or refuses an MPUB whole, so a batch's
requests are all answered 200 once its OK came, or all 503 (refused, no
connection, no answer within ``publish_timeout``): none is answered 200
unless its own messages were in an MPUB nsqd acknowledged, and a request
refused before it joined a batch (schema, size, token, rate) never touches
the others. A batch is closed early when one more request would take it over
nsqd's MPUB body size or :data:`~pipeline.client.publisher.MPUB_MAX_COUNT` messages;
a single ``/mpub`` larger than that count still goes whole, as its own MPUB.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Protocol

from pipeline.client.publisher import MPUB_MAX_COUNT, Publisher
from pipeline.errors import GatewayError

log = logging.getLogger(__name__)


class Waiter(Protocol):
    """What a batch answers: a request waiting for its MPUB."""

    def succeed(self) -> None:
        """nsqd acknowledged the MPUB holding this request's messages."""

    def fail(self, error: GatewayError) -> None:
        """The MPUB holding this request's messages was not acknowledged."""


class Batch:
    """The requests and messages of one future MPUB to one topic."""

    __slots__ = ("topic", "waiters", "messages", "size", "timer", "done")

    def __init__(self, topic: str):
        self.topic = topic
        self.waiters: list[Waiter] = []
        self.messages: list[bytes] = []
        self.size = 4  # MPUB body: a 4-byte count, then each message's 4-byte size and bytes
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def succeed(self) -> None:
        if self.done:
            return
        self.done = True
        for waiter in self.waiters:
            waiter.succeed()

    def fail(self, error: GatewayError) -> None:
        if self.done:
            return
        self.done = True
        log.warning("refused %d requests (%d messages) to topic %s: %s", len(self.waiters), len(self.messages),
                    self.topic, error.message)
        for waiter in self.waiters:
            waiter.fail(error)


class Coalescer:
    """Collects checked requests per topic and publishes each topic's batch as one MPUB.

    Parameters:
        publisher: the connection(s) to nsqd.
        max_body_size: nsqd's largest MPUB body in bytes (the gateway's ``max_body_size``).
        timeout: seconds to wait for nsqd's answer before every request of the batch is answered 503.
    """

    def __init__(self, publisher: Publisher, max_body_size: int, timeout: float):
        self.publisher, self.max_body_size, self.timeout = publisher, max_body_size, timeout
        self.open: dict[str, Batch] = {}
        self.pending: set[Batch] = set()  # sent, not yet answered
        self._scheduled = False

    def add(self, topic: str, messages: list[bytes], framed: int, waiter: Waiter) -> None:
        """Join ``waiter`` (whose ``messages`` frame to ``framed`` MPUB bytes) to ``topic``'s open batch."""
        batch = self.open.get(topic)
        if batch is not None and (len(batch.messages) + len(messages) > MPUB_MAX_COUNT
                                  or batch.size + framed - 4 > self.max_body_size):
            self._send(batch)
            batch = None
        if batch is None:
            batch = self.open[topic] = Batch(topic)
        batch.waiters.append(waiter)
        batch.messages.extend(messages)
        batch.size += framed - 4
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every open batch (called on the IOLoop iteration after the first request joined)."""
        self._scheduled = False
        batches = list(self.open.values())
        self.open.clear()
        for batch in batches:
            self._send(batch)

    def idle(self) -> bool:
        """True when no batch is open or waiting for nsqd."""
        return not self.open and not self.pending

    def _send(self, batch: Batch) -> None:
        if self.open.get(batch.topic) is batch:
            del self.open[batch.topic]
        if not self.publisher.connected():
            batch.fail(GatewayError(503, "NSQD_UNAVAILABLE", "no connection to nsqd; nothing was published"))
            return
        self.pending.add(batch)
        # the publisher's one-MPUB call: it tries the next nsqd on a refusal, never splits the batch
        future = self.publisher.mpub(batch.topic, batch.messages)
        timer = batch.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, batch)
        future.add_done_callback(functools.partial(self._answered, batch, timer))

    def _answered(self, batch: Batch, timer: asyncio.TimerHandle, future: asyncio.Future[Any]) -> None:
        self.pending.discard(batch)
        timer.cancel()
        error = future.exception()
        if error is None:
            batch.succeed()
        else:
            batch.fail(GatewayError(503, "NSQD_ERROR", f"nsqd did not accept the messages: {error}"))

    def _expire(self, batch: Batch) -> None:
        self.pending.discard(batch)
        batch.fail(GatewayError(503, "NSQD_TIMEOUT", f"no answer from nsqd within {self.timeout:g}s;"
                                                     " the messages may or may not have been published"))
