"""A blocking subscriber that leaves each message in flight until its caller answers it: FIN or REQ.

For tools that act on a message before answering it, as ``pipeline dead
redrive`` does: it republishes a dead letter's body, waits for nsqd's OK, and
only then FINs the letter. nsqd keeps a message in flight until its consumer
answers or the consumer's ``msg_timeout`` passes; a consumer that dies keeps
its messages in flight until then (nsqd does not requeue them when the
connection drops). So :class:`InFlightSubscriber` asks for its own, short,
``msg_timeout`` in its IDENTIFY, and :meth:`InFlightSubscriber.release`
requeues with no delay every message it was sent and never answered.

Example::

    with InFlightSubscriber("127.0.0.1:4150", "numbers.dead", "keep", rdy=10, msg_timeout=10) as sub:
        for message in sub.receive(timeout=1.0):
            if wanted(message):
                sub.finish([message])   # the others are requeued when the block ends
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from pipeline.client.nsqclient import FRAME_ERROR, FRAME_MESSAGE, FRAME_RESPONSE, NsqMessage, _Connection
from pipeline.errors import PublishError

log = logging.getLogger(__name__)

#: Seconds nsqd may take to confirm a CLS (CLOSE_WAIT) once the answers are sent.
CLOSE_TIMEOUT = 5.0
#: Seconds a message nsqd sent just before it read RDY 0 may still take to arrive.
STRAY_GRACE = 0.1
#: nsqd's answers to a FIN, REQ or TOUCH of a message no longer in flight: it had timed out, nsqd requeued it
#: and will send it again. Not an error for the connection.
LATE_ANSWER = (b"E_FIN_FAILED", b"E_REQ_FAILED", b"E_TOUCH_FAILED")


class InFlightSubscriber(_Connection):
    """One connection to one nsqd subscribed to ``topic/channel``; its caller answers every message.

    Parameters:
        address: nsqd's TCP address, ``host:port``.
        rdy: messages nsqd may have in flight to this connection at once (see :meth:`ready`).
        msg_timeout: seconds nsqd waits for an answer before it requeues a message (1 s at least);
            also how long the messages of a connection that died stay away.
        timeout: seconds to wait for the connection and for nsqd's answers to it.
        security: a :class:`pipeline.config.security.ClientSecurity` (TLS, AUTH), or None.

    Raises:
        PublishError: nsqd cannot be reached, or refuses the IDENTIFY or the subscription.
    """

    def __init__(self, address: str, topic: str, channel: str, *, rdy: int, msg_timeout: float,
                 timeout: float = 10.0, security=None):
        super().__init__(address, timeout, security, identify={"msg_timeout": max(1000, int(msg_timeout * 1000))})
        self.topic, self.channel = topic, channel
        #: Messages nsqd sent to this connection that were not answered yet, by id.
        self.unanswered: dict[bytes, NsqMessage] = {}
        self.rdy = 0
        self._send(b"SUB " + topic.encode() + b" " + channel.encode() + b"\n")
        frame, data = self._read_frame()
        if frame != FRAME_RESPONSE or data != b"OK":
            self.close()
            raise PublishError(f"SUB {topic}/{channel} refused by {address}: {data.decode(errors='replace')}")
        self.ready(rdy)

    def __exit__(self, *exc) -> None:
        self.release()

    def ready(self, count: int) -> None:
        """Let nsqd have up to ``count`` messages in flight to this connection (RDY), answered or not."""
        if count != self.rdy:
            self._send(b"RDY %d\n" % count)
            self.rdy = count

    def receive(self, timeout: float) -> Iterator[NsqMessage]:
        """Yield messages as nsqd sends them, unanswered, until none arrives for ``timeout`` seconds.

        A message that timed out in flight comes again with the same id (and one more attempt).

        Raises:
            PublishError: nsqd closed the connection or sent an error other than a late answer.
        """
        self._sock.settimeout(timeout)
        while True:
            try:
                frame, data = self._read_frame()
            except PublishError as e:
                if isinstance(e.__cause__, TimeoutError):  # quiet for ``timeout``: not an error
                    return
                raise
            if frame == FRAME_MESSAGE:
                message = NsqMessage(data)
                self.unanswered[message.id] = message
                yield message
            elif frame == FRAME_RESPONSE and data == b"_heartbeat_":
                self._send(b"NOP\n")
            elif frame == FRAME_ERROR and data.startswith(LATE_ANSWER):
                log.debug("nsqd %s: %s", self.address, data.decode(errors="replace"))
            elif frame == FRAME_ERROR:
                raise PublishError(f"nsqd {self.address} on {self.topic}/{self.channel}: "
                                   f"{data.decode(errors='replace')}")

    def finish(self, messages: Iterable[NsqMessage]) -> None:
        """FIN ``messages``: nsqd removes them from the channel (one write for all)."""
        self._answer(messages, b"FIN %s\n")

    def requeue(self, messages: Iterable[NsqMessage], delay: float = 0.0) -> None:
        """REQ ``messages``: nsqd queues them again, unchanged but for their attempts, after ``delay`` seconds.

        nsqd holds a delayed (deferred) message in memory until its time comes.
        """
        self._answer(messages, b"REQ %%s %d\n" % int(delay * 1000))

    def _answer(self, messages: Iterable[NsqMessage], command: bytes) -> None:
        ids = [message.id for message in messages]
        if ids:
            self._send(b"".join(command % mid for mid in ids))
            for mid in ids:
                self.unanswered.pop(mid, None)

    def release(self) -> None:
        """Requeue every unanswered message with no delay, close the subscription (CLS) and the connection.

        A message nsqd sent before it read the RDY 0 is requeued too, until
        nsqd confirms the close. When the connection is gone already, nsqd
        requeues what it still holds for it after ``msg_timeout``.
        """
        try:
            self._send(b"".join([b"RDY 0\n", *(b"REQ %s 0\n" % mid for mid in self.unanswered), b"CLS\n"]))
            self.unanswered.clear()
            self._requeue_strays()
        except PublishError as e:
            log.warning("nsqd %s: %s; what this connection held returns after its msg_timeout", self.address, e)
        finally:
            self.close()

    def _requeue_strays(self) -> None:
        deadline, closing = time.monotonic() + CLOSE_TIMEOUT, False
        self._sock.settimeout(STRAY_GRACE)
        while time.monotonic() < deadline:
            try:
                frame, data = self._read_frame()
            except PublishError as e:
                if not isinstance(e.__cause__, TimeoutError):
                    raise
                if closing:
                    return
                continue
            if frame == FRAME_MESSAGE:
                self._send(b"REQ %s 0\n" % NsqMessage(data).id)
            elif frame == FRAME_RESPONSE and data == b"CLOSE_WAIT":
                closing = True
            elif frame == FRAME_RESPONSE and data == b"_heartbeat_":
                self._send(b"NOP\n")
