"""Asynchronous publishing for the worker: MPUB per topic, resolved on nsqd's OK.

pynsq's ``Writer`` reports each answer through a callback and never times out.
:class:`Publisher` turns that into one future per batch of outputs that
resolves only when every MPUB was acknowledged, and fails with
:class:`~pipeline.errors.PublishError` on a refusal, a dropped connection or a
missed deadline, so the runtime can decide between FIN and REQ.

Where each MPUB goes is its topic's *placement* (:data:`Placement`): how many
copies (a replicated topic's ``replication``: each copy on its own node, the
MPUB acknowledged once every copy is) and an optional key that keeps the
topic on one node while it is up (a partition, or a keyed stage's output:
one key's records stay in order). A copy no other connected node can take is
given up: counted in :attr:`Publisher.under_replicated`, logged, and the
MPUB acknowledged with the copies it has.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

import nsq
from tornado.concurrent import Future

from pipeline.client.fastclient import FastWriter
from pipeline.client.nodepool import WARN_EVERY, NodeHealth, NodePool
from pipeline.client.nsqclient import chunked
from pipeline.errors import PublishError

log = logging.getLogger(__name__)

MPUB_MAX_COUNT = 2000

#: A topic's placement: its copies, and the key that keeps it on one node (None: round-robin).
Placement = tuple[int, "str | None"]


def one_copy(topic: str) -> Placement:
    """The default placement: one copy, round-robin over the nodes."""
    return 1, None


class Publisher:
    """Publishes encoded message bodies to nsqd through a pynsq ``Writer``.

    With several nsqd nodes, each MPUB goes to the next healthy node in turn
    (:class:`~pipeline.client.nodepool.NodePool`); a node that refuses it or loses
    its connection is skipped for a back-off and the MPUB goes to the next.
    pynsq reconnects lost connections every ``reconnect_interval`` seconds.

    Parameters:
        nsqd_tcp_addresses: the nsqd nodes to publish to.
        reconnect_interval: seconds between reconnection attempts.
        placement: a topic's :data:`Placement` (e.g. ``Topology.placement``); default one copy, round-robin.
        stats: a counter that gets ``under_replicated`` too (the worker's).
    """

    def __init__(self, nsqd_tcp_addresses: Sequence[str], reconnect_interval: float = 1.0,
                 placement: Callable[[str], Placement] = one_copy, stats: Counter[str] | None = None,
                 **conn_kwargs):
        self.writer = FastWriter(list(nsqd_tcp_addresses), reconnect_interval=reconnect_interval, **conn_kwargs)
        self.pool = NodePool(list(nsqd_tcp_addresses))  # pynsq names a connection by its host:port, as given
        self.holding = False  # see hold_answers
        self.placement = placement
        self.under_replicated = 0  # copies no node could take (fewer nodes up than copies)
        self.stats = stats if stats is not None else Counter()
        self._warned = 0.0

    def hold_answers(self, hold: bool) -> None:
        """Stop (True) or go back to (False) reading nsqd's answers; meanwhile they wait in the socket.

        For a caller that needs the answers only from time to time (a keyed worker, at its checkpoints):
        each answer read as it comes costs a wake-up. A connection made while answers are held is read
        until the next hold; a connection that breaks meanwhile is noticed at the next write.
        """
        if hold == self.holding:
            return
        self.holding = hold
        for conn in list(self.writer.conns.values()):
            conn.hold_reads(hold)

    def connected(self) -> bool:
        """True when at least one connection to nsqd is ready to publish."""
        return any(conn.connected() for conn in self.writer.conns.values())

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a connection is ready (so the first publish cannot fail for want of one).

        Raises:
            PublishError: no connection became ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.connected():
            if time.monotonic() > deadline:
                raise PublishError(
                    f"no connection to nsqd at {', '.join(self.writer.nsqd_tcp_addresses)} after {timeout:g}s")
            await asyncio.sleep(0.02)

    async def publish(self, outputs: Mapping[str, Sequence[bytes]], timeout: float) -> None:
        """Publish every topic's bodies and wait until nsqd acknowledged all of them.

        Raises:
            PublishError: a publish was refused, its connection closed, or the
                deadline passed first. Some chunks may have been accepted.
        """
        done: asyncio.Future[PublishError | None] = asyncio.get_running_loop().create_future()

        def finish(error: PublishError | None) -> None:
            if not done.done():
                done.set_result(error)

        self.send(outputs, timeout, finish)
        error = await done
        if error is not None:
            raise error

    def send(self, outputs: Mapping[str, Sequence[bytes]], timeout: float,
             on_done: Callable[[PublishError | None], None]) -> None:
        """:meth:`publish` without a coroutine: ``on_done(None)`` once nsqd acknowledged every body,
        ``on_done(error)`` (a :class:`PublishError`) at the first failure or at the deadline; called once,
        directly from the read that brought the answer (or from this call when nothing can be sent).

        A keyed worker publishes every batch this way: no task, future or extra loop turn per batch.
        """
        parts = [(topic, part) for topic, bodies in outputs.items() if bodies
                 for part in chunked(bodies, MPUB_MAX_COUNT)]
        if not parts:
            on_done(None)
            return
        waiting = _Waiting(on_done, len(parts), timeout)
        for topic, part in parts:
            self._start(topic, part, waiting.answered)

    def mpub(self, topic: str, bodies: Sequence[bytes]) -> Future:
        """One MPUB, to the next healthy node; on a refusal or a lost connection, to the next one.

        The future resolves with the OK of the node that took it, or fails once
        every connected node has failed it (the worker then requeues its inputs).
        """
        future: Future = Future()

        def answered(error: PublishError | None, data: bytes = b"OK") -> None:
            if error is None:
                future.set_result(data)
            else:
                future.set_exception(error)
        self._start(topic, list(bodies), answered)
        return future

    def _start(self, topic: str, bodies: list[bytes], answered: Callable[..., None]) -> None:
        copies, key = self.placement(topic)
        copies = min(copies, len(self.pool.order))
        if copies == 1:
            _Mpub(self, topic, bodies, answered, key).start()
        else:
            _Copies(self, topic, bodies, copies, key, answered).start()

    def gave_up_copies(self, topic: str, count: int, copies: int, placed: int, errors: str) -> None:
        """``count`` messages of ``topic`` were published with ``placed`` of their ``copies``: count, warn."""
        self.under_replicated += count * (copies - placed)
        self.stats["under_replicated"] += count * (copies - placed)
        now = time.monotonic()
        if now - self._warned > WARN_EVERY:
            self._warned = now
            log.warning("MPUB %s: %d messages got %d of their %d copies (%s); publishing goes on degraded "
                        "(%d copies missing so far)", topic, count, placed, copies, errors, self.under_replicated)

    def _connected(self, address: str) -> bool:
        conn = self.writer.conns.get(address)
        return conn is not None and conn.connected()

    def health(self) -> list[NodeHealth]:
        """Each nsqd's health as this publisher sees it."""
        return self.pool.snapshot()

    def close(self) -> None:
        """Close every connection; answers still outstanding fail their futures."""
        for conn in list(self.writer.conns.values()):
            conn.close()


class _Waiting:
    """The MPUBs of one :meth:`Publisher.send` still unanswered, and its deadline."""

    __slots__ = ("on_done", "left", "timer")

    def __init__(self, on_done: Callable[[PublishError | None], None], count: int, timeout: float):
        self.on_done, self.left = on_done, count
        self.timer = asyncio.get_running_loop().call_later(timeout, self._expired, timeout)

    def answered(self, error: PublishError | None, data: bytes = b"") -> None:
        if self.left <= 0:
            return  # answered already: failed, or past the deadline
        self.left = 0 if error is not None else self.left - 1
        if self.left == 0:
            self.timer.cancel()
            self.on_done(error)

    def _expired(self, timeout: float) -> None:
        if self.left > 0:
            self.left = 0
            self.on_done(PublishError(f"no OK from nsqd within {timeout:g}s"))


class _Mpub:
    """One MPUB and its attempts over the nodes; ``answered(None, data)`` on OK, ``answered(error)`` when
    every connected node failed it.

    A class rather than nested closures: a closure that retries itself is a
    reference cycle, which only the cyclic GC frees, and at tens of batches a
    second the uncollected bodies cost tens of megabytes.
    """

    __slots__ = ("publisher", "topic", "bodies", "answered", "errors", "address", "done", "key", "group")

    def __init__(self, publisher: Publisher, topic: str, bodies: list[bytes],
                 answered: Callable[..., None], key: str | None = None, group: _Copies | None = None):
        self.publisher, self.topic, self.bodies, self.answered = publisher, topic, bodies, answered
        self.errors: dict[str, str] = {}
        self.address: str | None = None
        self.done = False
        self.key, self.group = key, group  # the placement's key; the other copies of a replicated MPUB

    def start(self) -> None:
        self._attempt()

    def _attempt(self) -> None:
        publisher = self.publisher
        exclude: Collection[str] = self.errors if self.group is None else {*self.errors, *self.group.others(self)}
        self.address = publisher.pool.pick(exclude=exclude, usable=publisher._connected, key=self.key)
        if self.address is None:
            tried = "; ".join(f"{a}: {e}" for a, e in self.errors.items()) or "no connection to nsqd"
            self._answer(PublishError(f"MPUB {self.topic} ({len(self.bodies)} messages): {tried}"))
            return
        publisher.writer.mpub(self.topic, self.bodies, callback=self._on_answer, conn_id=self.address)

    def _answer(self, error: PublishError | None, data: bytes = b"") -> None:
        self.done = True
        self.bodies = []  # the answer is in: the bodies need not wait for the last reference to go
        self.answered(error, data)

    def _on_answer(self, conn, data) -> None:
        address = self.address
        if self.done or address is None:  # answered already (the deadline passed), or never sent
            return
        pool = self.publisher.pool
        if isinstance(data, nsq.Error):
            self.errors[address] = str(data)
            pool.failed(address, data)
            if len(pool.order) > 1:
                log.warning("MPUB %s to %s failed (%s); trying the next nsqd", self.topic, address, data)
            self._attempt()
        else:
            pool.succeeded(address)
            self._answer(None, data)


class _Copies:
    """The copies of one replicated MPUB, each an :class:`_Mpub` that avoids its siblings' nodes.

    ``answered(None, data)`` once every copy is answered and at least one was
    acknowledged (a copy that found no node of its own is given up and
    counted); ``answered(error)`` when none was.
    """

    __slots__ = ("publisher", "members", "left", "placed", "answered", "errors", "count")

    def __init__(self, publisher: Publisher, topic: str, bodies: list[bytes], copies: int, key: str | None,
                 answered: Callable[..., None]):
        self.publisher, self.answered, self.left, self.placed = publisher, answered, copies, 0
        self.errors: list[PublishError] = []
        self.count = len(bodies)
        self.members = [_Mpub(publisher, topic, bodies, self._answered, key, self) for _ in range(copies)]

    def start(self) -> None:
        for member in self.members:
            member.start()

    def others(self, member: _Mpub) -> set[str]:
        """The nodes the other copies are on, or were acknowledged by."""
        return {m.address for m in self.members if m is not member and m.address is not None}

    def _answered(self, error: PublishError | None, data: bytes = b"") -> None:
        self.left -= 1
        if error is None:
            self.placed += 1
        else:
            self.errors.append(error)
        if self.left:
            return
        member = self.members[0]
        if self.placed == 0:
            self.answered(self.errors[-1])
            return
        if self.errors:
            self.publisher.gave_up_copies(member.topic, self.count, len(self.members), self.placed,
                                          "; ".join(map(str, self.errors)))
        self.answered(None, data)
