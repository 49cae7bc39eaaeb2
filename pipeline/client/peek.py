"""A channel's queued messages held in flight and answered together: look without removing, or remove the first N.

nsqd hands a subscriber each message *in flight*: the message stays the
channel's until the subscriber answers FIN (removed) or REQ (back in the
queue), or until it times out (``msg_timeout``) and nsqd requeues it itself.
:func:`held` takes up to N messages in flight on as many connections as
nsqd's ``--max-rdy-count`` asks (RDY N in all, so nsqd sends no more while none
is answered), and answers them all on leaving: REQ with no delay, unless
marked to finish. :func:`peek` finishes none, so the channel holds what it
held before; :func:`trim` finishes what it took. A requeued message goes to
the back of the queue: the answers go in the order the messages came, so a
channel held whole on one connection (up to :data:`MAX_RDY` messages) keeps
its order, while a deeper one has the messages read moved back. Neither
can lose a message: one left unanswered when a connection closes is requeued
by nsqd after its ``msg_timeout``.

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

from pipeline.client.nsqclient import FRAME_MESSAGE, FRAME_RESPONSE, NsqMessage, NsqSubscriber
from pipeline.errors import PublishError

#: nsqd's default ``--max-rdy-count``: the most messages one connection may hold in flight.
MAX_RDY = 2500
#: Seconds without a new message after which a read stops short of its count.
QUIET = 1.0
#: Seconds nsqd may take to confirm the close (CLOSE_WAIT) once the answers are sent.
CLOSE_TIMEOUT = 5.0
#: Seconds a message nsqd sent just before RDY 0 reached it may still take to arrive.
STRAY_GRACE = 0.1
_TURN = 0.05  # seconds each connection is waited on per turn


class _Holder(NsqSubscriber):
    """One connection holding up to ``limit`` messages of a channel in flight, unanswered."""

    def __init__(self, address: str, topic: str, channel: str, limit: int, security, timeout: float):
        super().__init__(address, topic, channel, rdy=limit, timeout=timeout, security=security)
        self.limit = limit
        self.held: dict[bytes, NsqMessage] = {}

    def take(self, wait: float) -> int:
        """Take what arrives until ``wait`` seconds pass without a message (or the limit); return how many."""
        before = len(self.held)
        if before < self.limit:
            for message in self.receive(wait):
                self.held[message.id] = message  # one nsqd timed out and sent again comes twice
                if len(self.held) >= self.limit:
                    break
        return len(self.held) - before

    def release(self, finish: set[bytes]) -> None:
        """Stop deliveries, FIN the held messages in ``finish``, REQ the others with no delay, and close.

        The answers go in the order the messages came, so a channel held whole keeps its order.
        """
        try:
            answers = [b"RDY 0\n"]
            answers += [(b"FIN %s\n" if mid in finish else b"REQ %s 0\n") % mid for mid in self.held]
            self._send(b"".join(answers) + b"CLS\n")
            self._requeue_strays()
        except PublishError:
            pass  # the connection is gone: nsqd requeues what it still holds for us after msg_timeout
        finally:
            self.close()

    def _requeue_strays(self) -> None:
        # A message nsqd sent just before it read RDY 0 still arrives: answer it too, until
        # nsqd confirms the close (CLOSE_WAIT) and a short grace passes without another.
        deadline, closing = time.monotonic() + CLOSE_TIMEOUT, False
        self._sock.settimeout(STRAY_GRACE)
        while time.monotonic() < deadline:
            try:
                frame, data = self._read_frame()
            except PublishError as e:
                if isinstance(e.__cause__, TimeoutError):
                    if closing:
                        return
                    continue
                raise
            if frame == FRAME_MESSAGE:
                self._send(b"REQ %s 0\n" % NsqMessage(data).id)
            elif frame == FRAME_RESPONSE and data == b"CLOSE_WAIT":
                closing = True
            elif frame == FRAME_RESPONSE and data == b"_heartbeat_":
                self._send(b"NOP\n")
            # an error frame here is E_FIN_FAILED or E_REQ_FAILED: that message had timed out and
            # nsqd had requeued it already


@dataclass
class Held:
    """Messages of one channel on one nsqd, held in flight by :func:`held`, oldest (by publish time) first."""

    messages: list[NsqMessage]
    _finish: set[bytes] = field(default_factory=set)

    def finish(self, messages: Iterable[NsqMessage]) -> None:
        """Mark ``messages`` to be FINished (removed from the channel) on release; the others are requeued."""
        self._finish.update(m.id for m in messages)


@contextmanager
def held(address: str, topic: str, channel: str, count: int, *, quiet: float = QUIET, security=None,
         timeout: float = 10.0) -> Iterator[Held]:
    """Hold up to ``count`` messages of ``topic/channel`` on the nsqd at ``address`` in flight while the block runs.

    Messages come until ``count`` are held or ``quiet`` seconds pass without a new
    one. On leaving the block, even by an exception, each is answered: FIN if
    marked with :meth:`Held.finish`, else REQ with no delay.

    Raises:
        PublishError: nsqd cannot be reached or refuses the subscription (E_UNAUTHORIZED ...).
    """
    with ExitStack() as answers:
        holders: list[_Holder] = []
        finish: set[bytes] = set()
        for start in range(0, max(count, 0), MAX_RDY):
            holder = _Holder(address, topic, channel, min(MAX_RDY, count - start), security, timeout)
            holders.append(holder)
            answers.callback(holder.release, finish)
        last_new = time.monotonic()
        while sum(len(h.held) for h in holders) < count and time.monotonic() - last_new < quiet:
            if sum(h.take(_TURN) for h in holders):
                last_new = time.monotonic()
        unique = {m.id: m for h in holders for m in h.held.values()}
        yield Held(sorted(unique.values(), key=lambda m: m.timestamp), finish)


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
