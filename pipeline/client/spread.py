"""A blocking publisher over several nsqd nodes: round-robin, health tracking, failover.

Producers publish through :class:`SpreadPublisher` whatever the number of
nodes. Each MPUB batch goes to the next healthy node (see
:class:`~pipeline.client.nodepool.NodePool`) on that node's pipelined connection
(:class:`~pipeline.client.nsqclient.NsqPublisher`). A batch counts as published
only when the node that took it answered OK. When a node refuses a batch,
drops its connection or does not answer in time, the node is marked down
and every batch it had not acknowledged is sent, unchanged and in order, to
the next node. So no record is lost or counted twice; a batch whose OK was
lost with the connection may reach consumers twice, with the same ids,
which is the pipeline's at-least-once contract.

A replicated topic (``copies(topic)`` above 1) has each batch sent to that
many distinct nodes: a batch counts as published once every copy was
acknowledged. A copy no other node can take (fewer nodes up than copies)
is given up, counted in :attr:`SpreadPublisher.under_replicated` and
logged: publishing goes on, degraded, on the nodes that are up.

Example::

    with SpreadPublisher(["127.0.0.1:4150", "127.0.0.1:4152"]) as pub:
        pub.send_mpub("numbers", bodies)     # goes to a node; may wait for older answers
        pub.flush()                          # every batch acknowledged by some node
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from pipeline.client.nodepool import WARN_EVERY, NodeHealth, NodePool
from pipeline.client.nsqclient import NsqPublisher
from pipeline.errors import PublishError, PublishRefused

log = logging.getLogger(__name__)

FAILOVER_TIMEOUT = 5.0  # a batch no node takes within this long fails the publish


@dataclass
class _Batch:
    """One MPUB and what it stands for."""

    topic: str
    bodies: Sequence[bytes]
    records: int
    key: str | None
    since: float = 0.0  # monotonic time of its first failure: the failover deadline counts from there
    refused_by: dict[str, str] = field(default_factory=dict)  # node -> its refusal
    copies: _Copies | None = None  # a replicated topic's batch: its copies, each on its own node
    address: str | None = None  # the node it was sent to, while it waits for the answer


@dataclass(eq=False)
class _Copies:
    """The copies of one replicated batch: how many are still unanswered."""

    batches: list[_Batch] = field(default_factory=list)
    left: int = 0
    placed: int = 0  # copies acknowledged

    def others(self, batch: _Batch) -> set[str]:
        """The nodes the batch's other copies are on (a copy never joins a sibling on its node)."""
        return {b.address for b in self.batches if b is not batch and b.address is not None}


class SpreadPublisher:
    """Publishes MPUB batches across nsqd nodes and waits for each one's OK.

    Parameters:
        addresses: the nsqd TCP addresses (``host:port``).
        timeout: seconds to wait for a connection and for each answer.
        window: MPUBs sent to one node before waiting for its oldest answer.
        failover_timeout: seconds a batch may spend looking for a node that
            takes it before :class:`PublishError` is raised.
        copies: a topic's copies (``Topology.copies``); default one.
    """

    def __init__(self, addresses: Sequence[str], timeout: float = 10.0, window: int = 8,
                 failover_timeout: float = FAILOVER_TIMEOUT, security=None,
                 copies: Callable[[str], int] | None = None):
        self.pool = NodePool(list(addresses))
        self.security = security  # TLS and AUTH for every node, a pipeline.config.security.ClientSecurity
        self.timeout, self.window, self.failover_timeout = timeout, max(1, window), failover_timeout
        self._conns: dict[str, NsqPublisher] = {}
        self._pending: dict[str, deque[_Batch]] = {address: deque() for address in self.pool.order}
        self._retry: deque[_Batch] = deque()
        self.acked = 0  # messages acknowledged
        self.acked_records = 0  # records they carry (more than messages with envelopes)
        self.by_node: Counter[str] = Counter()  # messages acknowledged per node
        self.failovers = 0  # batches sent again to another node
        self.copies = copies or (lambda topic: 1)
        self.under_replicated = 0  # messages published with fewer copies than their topic asks
        self._warned = 0.0

    def __enter__(self) -> SpreadPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection; the publisher reconnects on its next send."""
        for address in list(self._conns):
            self._drop(address)

    def health(self) -> list[NodeHealth]:
        """Each node's health as this publisher sees it."""
        return self.pool.snapshot()

    # -- publishing ----------------------------------------------------------

    def mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish ``bodies`` in one MPUB and wait until every outstanding batch is acknowledged."""
        self.send_mpub(topic, bodies)
        self.flush()

    def send_mpub(self, topic: str, bodies: Sequence[bytes], records: int | None = None,
                  key: str | None = None) -> None:
        """Send one MPUB to a node without waiting for its answer (beyond the window).

        Parameters:
            records: how many records the bodies carry (envelopes); default one per body.
            key: keep batches with the same key on one node while it is up (per-partition order).

        Raises:
            PublishError: no node took some batch within ``failover_timeout``, or
                every node refused it.
        """
        if not bodies:
            return
        records = len(bodies) if records is None else records
        copies = min(self.copies(topic), len(self.pool.order))
        if copies == 1:
            self._retry.append(_Batch(topic, bodies, records, key))
        else:
            group = _Copies(left=copies)
            group.batches = [_Batch(topic, bodies, records, key, copies=group) for _ in range(copies)]
            self._retry.extend(group.batches)
        self._place_all()

    def flush(self) -> int:
        """Wait until every batch sent is acknowledged by some node; return the messages acknowledged."""
        before = self.acked
        while True:
            self._place_all()
            busy = [address for address, pending in self._pending.items() if pending]
            if not busy:
                return self.acked - before
            for address in busy:
                while self._pending[address]:
                    if not self._await_one(address):
                        break

    # -- internals -----------------------------------------------------------

    def _place_all(self) -> None:
        while self._retry:
            if self._place(self._retry[0]):
                self._retry.popleft()

    def _place(self, batch: _Batch) -> bool:
        """Send ``batch`` to a node; False when that node failed (its batches are queued again)."""
        exclude: Collection[str] = batch.refused_by
        if batch.copies is not None and (others := batch.copies.others(batch)):
            # a copy waits for no node: one that is down now is no place for it while another copy is placed
            exclude = {*exclude, *others}
            if self.pool.pick(exclude=exclude, usable=self.pool.is_up, key=batch.key) is None:
                self._give_up_copy(batch)
                return True
        address = self.pool.pick(exclude=exclude, key=batch.key)
        if address is None:
            reasons = "; ".join(f"{a}: {r}" for a, r in batch.refused_by.items())
            raise PublishError(f"every nsqd refused MPUB {batch.topic} ({len(batch.bodies)} messages): {reasons}")
        self._wait_until_up(address, batch)
        pending = self._pending[address]
        while len(pending) >= self.window:
            if not self._await_one(address):
                return False
        try:
            conn = self._connect(address)
            conn.send_mpub(batch.topic, batch.bodies)
        except PublishError as e:
            self._lost(address, self._salvage(address) or e)
            return False
        pending.append(batch)
        batch.address = address
        return True

    def _give_up_copy(self, batch: _Batch) -> None:
        """No node but its siblings' can take this copy: publish on with fewer copies, counted and logged."""
        self.under_replicated += len(batch.bodies)
        now = time.monotonic()
        if now - self._warned > WARN_EVERY:
            self._warned = now
            reasons = "; ".join(f"{a}: {r}" for a, r in batch.refused_by.items()) or "no other nsqd is up"
            log.warning("MPUB %s: %d messages kept fewer copies than the topic's %d (%s); publishing goes on "
                        "degraded (%d under-replicated so far)", batch.topic, len(batch.bodies),
                        len(batch.copies.batches) if batch.copies else 1, reasons, self.under_replicated)
        self._copy_done(batch, acknowledged=False)

    def _copy_done(self, batch: _Batch, acknowledged: bool) -> None:
        """One copy is answered (or given up); the batch counts as acknowledged once every copy is."""
        group = batch.copies
        if group is not None:
            group.left -= 1
            group.placed += acknowledged
            if group.left or not group.placed:
                return
        self.acked += len(batch.bodies)
        self.acked_records += batch.records

    def _salvage(self, address: str) -> PublishError | None:
        """After a failed send, take the answers the node sent before it closed; return its refusal, if any.

        nsqd closes the connection after refusing a batch, so the next send
        fails first; the refusal (and the OKs before it) are still readable.
        """
        while self._pending[address] and address in self._conns:
            batch = self._pending[address][0]
            try:
                self._conns[address].await_answer()
            except PublishRefused as e:
                batch.refused_by[address] = str(e)
                return e
            except PublishError:
                return None
            self._acknowledged(address)
        return None

    def _wait_until_up(self, address: str, batch: _Batch) -> None:
        # Every eligible node is in its back-off: wait for the first to come back,
        # within the batch's failover deadline. (Pacing, not synchronisation.)
        node = self.pool.nodes[address]
        now = time.monotonic()
        if node.up(now):
            return
        batch.since = batch.since or now
        if node.down_until > batch.since + self.failover_timeout:
            raise PublishError(f"no nsqd took MPUB {batch.topic} ({len(batch.bodies)} messages) within "
                               f"{self.failover_timeout:g}s; last error at {address}: {node.last_error}")
        delay = node.down_until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _connect(self, address: str) -> NsqPublisher:
        conn = self._conns.get(address)
        if conn is None:
            # NsqPublisher's own window is not used: this class keeps each node's window.
            conn = self._conns[address] = NsqPublisher(address, timeout=self.timeout, window=1 << 30,
                                                                security=self.security)
        return conn

    def _await_one(self, address: str) -> bool:
        """Wait for ``address``'s oldest answer; False when the node failed instead."""
        batch = self._pending[address][0]
        try:
            self._conns[address].await_answer()
        except PublishRefused as e:
            batch.refused_by[address] = str(e)
            self._lost(address, e)
            return False
        except PublishError as e:
            self._lost(address, e)
            return False
        self._acknowledged(address)
        return True

    def _acknowledged(self, address: str) -> None:
        batch = self._pending[address].popleft()
        self.pool.succeeded(address)
        self.by_node[address] += len(batch.bodies)
        self._copy_done(batch, acknowledged=True)

    def _lost(self, address: str, error: Exception) -> None:
        """The node failed: mark it down and queue its unacknowledged batches, in order, first."""
        self.pool.failed(address, error)
        self._drop(address)
        pending = self._pending[address]
        now = time.monotonic()
        for batch in pending:
            batch.since = batch.since or now
            batch.address = None
        self.failovers += len(pending)
        self._retry.extendleft(reversed(pending))
        pending.clear()

    def _drop(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.close()
