"""Asynchronous publishing for the worker: MPUB per topic, resolved on nsqd's OK.

pynsq's ``Writer`` reports each answer through a callback and never times out.
:class:`Publisher` turns that into one future per batch of outputs that
resolves only when every MPUB was acknowledged, and fails with
:class:`~pipeline.errors.PublishError` on a refusal, a dropped connection or a
missed deadline, so the runtime can decide between FIN and REQ.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping, Sequence

import nsq
from tornado.concurrent import Future

from .errors import PublishError
from .fastconn import FastWriter
from .nodepool import NodeHealth, NodePool
from .nsqclient import chunked

log = logging.getLogger(__name__)

MPUB_MAX_COUNT = 2000


class Publisher:
    """Publishes encoded message bodies to nsqd through a pynsq ``Writer``.

    With several nsqd nodes, each MPUB goes to the next healthy node in turn
    (:class:`~pipeline.nodepool.NodePool`); a node that refuses it or loses
    its connection is skipped for a back-off and the MPUB goes to the next.
    pynsq reconnects lost connections every ``reconnect_interval`` seconds.

    Parameters:
        nsqd_tcp_addresses: the nsqd nodes to publish to.
        reconnect_interval: seconds between reconnection attempts.
    """

    def __init__(self, nsqd_tcp_addresses: Sequence[str], reconnect_interval: float = 1.0, **conn_kwargs):
        self.writer = FastWriter(list(nsqd_tcp_addresses), reconnect_interval=reconnect_interval, **conn_kwargs)
        self.pool = NodePool(list(nsqd_tcp_addresses))  # pynsq names a connection by its host:port, as given

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
        futures = [self.mpub(topic, part)
                   for topic, bodies in outputs.items() if bodies
                   for part in chunked(bodies, MPUB_MAX_COUNT)]
        if not futures:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            raise PublishError(f"no OK from nsqd within {timeout:g}s") from None

    def mpub(self, topic: str, bodies: Sequence[bytes]) -> Future:
        """One MPUB, to the next healthy node; on a refusal or a lost connection, to the next one.

        The future resolves with the OK of the node that took it, or fails once
        every connected node has failed it (the worker then requeues its inputs).
        """
        return _Mpub(self, topic, list(bodies)).start()

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


class _Mpub:
    """One MPUB and its attempts over the nodes.

    A class rather than nested closures: a closure that retries itself is a
    reference cycle, which only the cyclic GC frees, and at tens of batches a
    second the uncollected bodies cost tens of megabytes.
    """

    __slots__ = ("publisher", "topic", "bodies", "future", "errors", "address")

    def __init__(self, publisher: Publisher, topic: str, bodies: list[bytes]):
        self.publisher, self.topic, self.bodies = publisher, topic, bodies
        self.future: Future = Future()
        self.errors: dict[str, str] = {}
        self.address: str | None = None

    def start(self) -> Future:
        self._attempt()
        return self.future

    def _attempt(self) -> None:
        publisher = self.publisher
        self.address = publisher.pool.pick(exclude=self.errors, usable=publisher._connected)
        if self.address is None:
            tried = "; ".join(f"{a}: {e}" for a, e in self.errors.items()) or "no connection to nsqd"
            self.future.set_exception(PublishError(f"MPUB {self.topic} ({len(self.bodies)} messages): {tried}"))
            return
        publisher.writer.mpub(self.topic, self.bodies, callback=self._on_answer, conn_id=self.address)

    def _on_answer(self, conn, data) -> None:
        if self.future.done():
            return
        pool = self.publisher.pool
        if isinstance(data, nsq.Error):
            self.errors[self.address] = str(data)
            pool.failed(self.address, data)
            if len(pool.order) > 1:
                log.warning("MPUB %s to %s failed (%s); trying the next nsqd", self.topic, self.address, data)
            self._attempt()
        else:
            pool.succeeded(self.address)
            self.future.set_result(data)
