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
from .nsqclient import chunked

log = logging.getLogger(__name__)

MPUB_MAX_COUNT = 2000


class Publisher:
    """Publishes encoded message bodies to nsqd through a pynsq ``Writer``.

    Parameters:
        nsqd_tcp_addresses: the nsqd nodes to publish to.
        reconnect_interval: seconds between reconnection attempts.
    """

    def __init__(self, nsqd_tcp_addresses: Sequence[str], reconnect_interval: float = 1.0, **conn_kwargs):
        self.writer = FastWriter(list(nsqd_tcp_addresses), reconnect_interval=reconnect_interval, **conn_kwargs)

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
        futures = [self._mpub(topic, part)
                   for topic, bodies in outputs.items() if bodies
                   for part in chunked(bodies, MPUB_MAX_COUNT)]
        if not futures:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            raise PublishError(f"no OK from nsqd within {timeout:g}s") from None

    def _mpub(self, topic: str, bodies: Sequence[bytes]) -> Future:
        future: Future = Future()

        def on_answer(conn, data) -> None:
            if future.done():
                return
            if isinstance(data, nsq.Error):
                future.set_exception(PublishError(f"MPUB {topic} ({len(bodies)} messages): {data}"))
            else:
                future.set_result(data)

        self.writer.mpub(topic, list(bodies), callback=on_answer)
        return future

    def close(self) -> None:
        """Close every connection; answers still outstanding fail their futures."""
        for conn in list(self.writer.conns.values()):
            conn.close()
