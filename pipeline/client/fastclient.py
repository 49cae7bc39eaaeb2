"""pynsq's Reader and Writer on :class:`pipeline.client.fastconn.FastConn` connections.

:class:`FastReader` hands a batch handler the messages of each read as one
list; :class:`FastWriter` builds an MPUB frame in one join and can pick its
connection. Both keep pynsq's behaviour otherwise (RDY, backoff, discovery);
see :mod:`pipeline.client.fastconn` for what the connection changes. A
:class:`FastReader` also reconnects to the nsqd it was given every
``RECONNECT_S`` while the connection is lost, as the writer does, rather than
wait for a lookupd poll that may not come for 10 s or more.
"""
from __future__ import annotations

import functools
import logging
import random
import time

import nsq
from nsq import protocol

from pipeline.client.fastconn import FastConn, FastMessage, frame_scanner
from pipeline.client.nsqclient import encode_mpub

log = logging.getLogger(__name__)

#: Seconds between a reader's attempts to connect to one nsqd (pynsq: 10, and 15 to reconnect without lookupd).
RECONNECT_S = 1.0


class FastReader(nsq.Reader):
    """pynsq's ``Reader`` on :class:`FastConn` connections.

    With ``batch_handler`` (instead of ``message_handler``), the messages of
    each read are handed over as one list; messages that arrive before the
    connection's fast I/O starts come one at a time, as a list of one.
    ``max_tries`` must then be 0: the batch handler decides what to do with
    a message's attempts.
    """

    def __init__(self, *args, batch_handler=None, **kwargs):
        if batch_handler is not None:
            if kwargs.setdefault("max_tries", 0):
                raise ValueError("FastReader: a batch_handler needs max_tries=0")
            kwargs["message_handler"] = lambda message: batch_handler([message])
            frame_scanner()  # compile (or load) the frame scanner now rather than on the first read
        self.batch_handler = batch_handler
        self._connecting: set[str] = set()  # attempts not yet ready or closed: never two to one node at once
        self._closing = False
        super().__init__(*args, **kwargs)

    def _on_messages(self, conn: FastConn, messages: list[FastMessage]) -> None:
        self._maybe_update_rdy(conn)
        self.batch_handler(messages)

    def connect_to_nsqd(self, host: str, port: int):
        """Connect to one nsqd, as pynsq's ``Reader.connect_to_nsqd`` does, with a :class:`FastConn`."""
        conn = _conn(self, host, port, message=self._on_message, heartbeat=self._on_heartbeat,
                     backoff=functools.partial(self._on_backoff_resume, success=False),
                     resume=functools.partial(self._on_backoff_resume, success=True),
                     **{"continue": functools.partial(self._on_backoff_resume, success=None)})
        if self.batch_handler is not None:
            conn.on_messages = self._on_messages
        if conn.id in self.conns or conn.id in self._connecting:
            return None
        # like pynsq: at most one connection attempt per destination every RECONNECT_S
        now = time.time()
        last = self.connection_attempts.get(conn.id)
        if last and last > now - RECONNECT_S:
            return None
        self.connection_attempts[conn.id] = now
        self._connecting.add(conn.id)
        log.info("[%s:%s] connecting to nsqd", conn.id, self.name)
        conn.connect()
        return conn

    def _on_connection_ready(self, conn, **kwargs) -> None:
        self._connecting.discard(conn.id)
        super()._on_connection_ready(conn, **kwargs)

    def _on_connection_close(self, conn, **kwargs) -> None:
        self._connecting.discard(conn.id)
        super()._on_connection_close(conn, **kwargs)
        # A node we were given is tried again until it answers: a connection reset, or a node restarting,
        # costs about a second of reading it, not the next lookupd poll after pynsq's 10-s attempt throttle.
        if not self._closing and conn.id in self.nsqd_tcp_addresses:
            self.io_loop.call_later(RECONNECT_S, self._reconnect, conn.host, conn.port)

    def _reconnect(self, host: str, port: int) -> None:
        if not self._closing:
            self.connect_to_nsqd(host, port)

    def close(self) -> None:
        """Close every connection and stop reconnecting (pynsq's ``Reader.close``)."""
        self._closing = True
        super().close()


class FastWriter(nsq.Writer):
    """pynsq's ``Writer`` on :class:`FastConn` connections, with MPUB frames built in one join."""

    def mpub(self, topic: str, msg, callback=None, conn_id: str | None = None):
        """Publish several bodies in one MPUB, as pynsq's ``Writer.mpub`` (whose framing is quadratic).

        ``conn_id`` (``host:port``) picks the connection; by default a random open one.
        """
        bodies = [msg] if isinstance(msg, bytes) else msg
        if callback is None:
            callback = functools.partial(self._finish_pub, command="mpub", topic=topic, msg=bodies)
        if conn_id is not None:
            conn = self.conns.get(conn_id)
            if conn is None or not conn.connected():
                callback(None, protocol.SendError(f"{conn_id} is not connected"))
                return None
        else:
            open_connections = [conn for conn in self.conns.values() if conn.connected()]
            if not open_connections:
                callback(None, protocol.SendError("no open connections"))
                return None
            conn = random.choice(open_connections)
        conn.callback_queue.append(callback)
        try:
            conn.write(encode_mpub(topic, bodies))
        except Exception as e:
            log.exception("[%s] failed to send mpub", conn.id)
            conn.callback_queue.remove(callback)
            callback(None, protocol.SendError("send error", e))
            conn.close()
        return None

    def connect_to_nsqd(self, host: str, port: int) -> None:
        """Connect to one nsqd, as pynsq's ``Writer.connect_to_nsqd`` does, with a :class:`FastConn`."""
        conn = _conn(self, host, port, response=self._on_connection_response, heartbeat=self.heartbeat)
        if conn.id in self.conns:
            return
        log.info("[%s] connecting to nsqd", conn.id)
        conn.connect()
        conn.callback_queue = []


def _conn(client: nsq.Reader | nsq.Writer, host: str, port: int, **handlers) -> FastConn:
    """A :class:`FastConn` to ``host:port`` with ``client``'s handlers of the connection events both pynsq's
    Reader and Writer listen to, and ``handlers`` (event name -> handler) of their own."""
    conn = FastConn(host, port, **client.conn_kwargs)
    for name, handler in (("identify", client._on_connection_identify),
                          ("identify_response", client._on_connection_identify_response),
                          ("auth", client._on_connection_auth), ("auth_response", client._on_connection_auth_response),
                          ("error", client._on_connection_error), ("close", client._on_connection_close),
                          ("ready", client._on_connection_ready), *handlers.items()):
        conn.on(name, handler)
    return conn
