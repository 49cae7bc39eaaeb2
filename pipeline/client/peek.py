"""A channel's queued messages held in flight and answered together: look without removing, or remove the first N.

nsqd hands a subscriber each message *in flight*: the message stays the
channel's until the subscriber answers FIN (removed) or REQ (back in the
queue), or until it times out (``msg_timeout``) and nsqd requeues it itself.
:func:`held` takes up to N messages in flight on as many
:class:`~pipeline.client.inflight.InFlightSubscriber` connections as nsqd's
``--max-rdy-count`` asks (RDY N in all, so nsqd sends no more while none is
answered), and answers them all on leaving: REQ with no delay, unless marked
to finish. :func:`peek` finishes none, so the channel holds what it
held before; :func:`trim` finishes what it took. A requeued message goes to
the back of the queue: the answers go in the order the messages came, so a
channel held whole on one connection (up to :data:`MAX_RDY` messages) keeps
its order, while a deeper one has the messages read moved back. Neither
can lose a message: one left unanswered when a connection dies is requeued
by nsqd after :data:`MSG_TIMEOUT`.

Each delivery adds one to a message's ``attempts``, which a stage compares with
its ``max_tries``: peek a stage's own channel knowingly.

Example::

    for message in peek("127.0.0.1:4150", "numbers.dead", "keep", 10):
        print(message.body)
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from pipeline.client.inflight import InFlightSubscriber
from pipeline.client.nsqclient import NsqMessage

#: nsqd's default ``--max-rdy-count``: the most messages one connection may hold in flight.
MAX_RDY = 2500
#: Seconds without a new message after which a read stops short of its count.
QUIET = 1.0
#: Seconds nsqd waits for a look's answers; also how long the messages of a look that died stay away.
MSG_TIMEOUT = 30.0
_TURN = 0.05  # seconds each connection is waited on per turn


@dataclass
class Held:
    """Messages of one channel on one nsqd, held in flight by :func:`held`, oldest (by publish time) first."""

    messages: list[NsqMessage]
    finishing: set[bytes] = field(default_factory=set)

    def finish(self, messages: Iterable[NsqMessage]) -> None:
        """Mark ``messages`` to be FINished (removed from the channel) on leaving; the others are requeued."""
        self.finishing.update(m.id for m in messages)


@contextmanager
def held(address: str, topic: str, channel: str, count: int, *, quiet: float = QUIET, security=None,
         timeout: float = 10.0) -> Iterator[Held]:
    """Hold up to ``count`` messages of ``topic/channel`` on the nsqd at ``address`` in flight while the block runs.

    Messages come until ``count`` are held or ``quiet`` seconds pass without a new
    one. On leaving the block each is answered: FIN if marked with
    :meth:`Held.finish`, else REQ with no delay, in the order they came (an
    exception in the block requeues them all).

    Raises:
        PublishError: nsqd cannot be reached or refuses the subscription (E_UNAUTHORIZED ...).
    """
    with ExitStack() as connections:
        subscribers: list[InFlightSubscriber] = []
        for start in range(0, max(count, 0), MAX_RDY):
            subscribers.append(connections.enter_context(InFlightSubscriber(
                address, topic, channel, rdy=min(MAX_RDY, count - start), msg_timeout=MSG_TIMEOUT,
                timeout=timeout, security=security)))
        taken: dict[bytes, NsqMessage] = {}  # one nsqd timed out and sent again comes twice
        last_new = time.monotonic()
        while len(taken) < count and time.monotonic() - last_new < quiet:
            before = len(taken)
            for subscriber in subscribers:
                taken.update((m.id, m) for m in subscriber.receive(_TURN))
            if len(taken) > before:
                last_new = time.monotonic()
        holding = Held(sorted(taken.values(), key=lambda m: m.timestamp))
        yield holding
        for subscriber in subscribers:
            subscriber.finish([m for mid, m in subscriber.unanswered.items() if mid in holding.finishing])


def peek(address: str, topic: str, channel: str, count: int, **options) -> list[NsqMessage]:
    """Up to ``count`` queued messages of ``topic/channel``, oldest first, every one left in the channel.

    ``options`` are :func:`held`'s (``quiet``, ``security``, ``timeout``).
    """
    with held(address, topic, channel, count, **options) as taken:
        return taken.messages


def trim(address: str, topic: str, channel: str, count: int, **options) -> int:
    """Remove up to ``count`` messages of ``topic/channel``, the oldest first as nsqd delivers them; return how many.

    ``options`` are :func:`held`'s (``quiet``, ``security``, ``timeout``).
    """
    with held(address, topic, channel, count, **options) as taken:
        taken.finish(taken.messages)
        return len(taken.messages)
