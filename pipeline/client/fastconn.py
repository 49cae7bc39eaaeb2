"""A faster pynsq connection: an asyncio transport, one socket write per loop iteration, all frames per read.

It keeps pynsq's protocol, handshake and events unchanged and changes only
the I/O (why: docs/PERFORMANCE.md, "The connection"):

- the socket is an asyncio transport whose protocol hands every read to the
  connection at once (no future, no extra loop iteration per read);
- ``send`` appends to a buffer written by one ``transport.write`` on the next
  loop iteration, so the FINs of a whole batch leave in one write; ``close``
  writes what was sent before closing (an IOStream drops it);
- a read is cut into every complete frame it holds, keeping a partial frame
  for the next read;
- with a *batch handler* (:class:`FastReader`'s ``batch_handler``), the
  messages of one read reach it as one list, with RDY checked once per read
  instead of once per message and no event per message; the frames of a
  large read are found by one compiled pass (:mod:`pipeline.client.frames`) and the
  messages cut out of it with no Python code per message but their
  constructor; :func:`finish_all` finishes a batch with one FIN payload and
  one RESUME per connection.

TLS is started on the same transport (``loop.start_tls``) when nsqd offers it
and the client asks for it, as pynsq does; snappy and deflate are not
supported (the pipeline never asks for them). :mod:`pipeline.client.fastclient`
has pynsq's Reader and Writer on this connection class; FIN/REQ/TOUCH/RDY
behave as in pynsq.
"""
from __future__ import annotations

import asyncio
import logging
import operator
import ssl
import struct
import threading
import time
from collections.abc import Callable
from itertools import repeat

import nsq
from nsq import event, protocol
from tornado.iostream import StreamClosedError
from tornado.netutil import ssl_options_to_context

from pipeline.records import jit

log = logging.getLogger(__name__)

#: Reads shorter than this are cut into frames in plain Python: for a few frames that is cheaper than a
#: call of the compiled scanner and the numpy arrays around it.
SCAN_MIN_BYTES = 8192
_SIZE = struct.Struct(">l")
_FRAMES = jit.register("pipeline.client.frames")
_MESSAGE_HEADER = struct.Struct(">qH")  # timestamp (ns), attempts; then 16 bytes of id, then the body
_FRAME_MESSAGE = struct.pack(">l", protocol.FRAME_TYPE_MESSAGE)


class FastMessage:
    """A message that answers through its connection directly instead of through events.

    pynsq's ``Message`` registers three listeners (each with a duplicate
    check) only so its connection can send FIN, REQ or TOUCH; calling the
    connection's handlers directly does the same with none of that, and
    slots make it cheap enough to build thousands per read. It offers what
    pynsq's ``Reader`` and our runtime use of ``nsq.Message``: ``id``,
    ``body``, ``timestamp``, ``attempts``, :meth:`finish`, :meth:`requeue`,
    :meth:`touch`, :meth:`has_responded`, and is always asynchronous (the
    worker answers every message itself, after its batch).
    """

    __slots__ = ("_conn", "id", "body", "timestamp", "attempts", "_has_responded")

    def __init__(self, conn: FastConn, id: bytes, body: bytes, timestamp: int, attempts: int):
        self._conn, self.id, self.body, self.timestamp, self.attempts = conn, id, body, timestamp, attempts
        self._has_responded = False

    def __repr__(self) -> str:
        return f"<FastMessage {self.id!r} attempts={self.attempts} {len(self.body)} bytes>"

    def enable_async(self) -> None:
        """Nothing to do: a FastMessage is always asynchronous."""

    def is_async(self) -> bool:
        """Always True (pynsq's Reader then leaves the answer to the handler)."""
        return True

    def has_responded(self) -> bool:
        """Whether FIN or REQ was sent for this message."""
        return self._has_responded

    def _respond(self) -> None:
        if self._has_responded:
            raise nsq.Error(f"message {self.id!r} was already answered")
        self._has_responded = True

    def finish(self) -> None:
        """Tell nsqd the message is done (FIN)."""
        self._respond()
        self._conn._on_message_finish(self)

    def requeue(self, **kwargs) -> None:
        """Give the message back to nsqd (REQ); takes pynsq's ``backoff``, ``delay`` and ``time_ms``."""
        delay = kwargs.get("delay")
        if isinstance(delay, int) and delay >= 0:
            kwargs["time_ms"] = delay * 1000
        self._respond()
        self._conn._on_message_requeue(self, **kwargs)

    def touch(self) -> None:
        """Ask nsqd for more time (TOUCH)."""
        if self._has_responded:
            raise nsq.Error(f"message {self.id!r} was already answered")
        self._conn._on_message_touch(self)


def finish_all(messages) -> None:
    """FIN every message not answered yet: one FIN payload and one RESUME per connection.

    The same as calling ``finish()`` on each, except that pynsq's backoff
    timer counts one success per connection and call rather than per message.
    """
    pending = [message for message in messages if not message._has_responded]
    for message in pending:
        message._has_responded = True
    conns = set(map(_CONN, pending))
    if len(conns) == 1:  # the usual case: a batch read from one connection
        conns.pop()._finish_ids(list(map(_ID, pending)))
        return
    ids: dict[FastConn, list[bytes]] = {}
    for message in pending:
        ids.setdefault(message._conn, []).append(message.id)
    for conn, message_ids in ids.items():
        conn._finish_ids(message_ids)


_CONN, _ID = operator.attrgetter("_conn"), operator.attrgetter("id")


def frame_scanner():
    """:mod:`pipeline.client.frames`, imported on first use (it loads numba, which writers such as the gateway never
    need), or None while a worker's kernels load in the background (see :mod:`pipeline.records.jit`)."""
    return jit.kernel(_FRAMES)


def _retrieve(future: asyncio.Future) -> None:
    # A failed flush is reported through the connection's error event; mark the
    # future's exception retrieved so asyncio does not log it a second time.
    if not future.cancelled():
        future.exception()


class _Reads(threading.local):
    """This thread's read in progress (one event loop per thread): what waits for its end.

    While a read is handled, whatever is sent on any connection (a batch handled inline: its MPUB,
    its FINs) is written when the read is done, one write per connection, and callbacks registered
    with :func:`when_read_done` run just before that; outside a read, both happen on the next loop turn.
    """

    def __init__(self) -> None:
        self.pending: list[FastConn] = []  # connections with data to write
        self.after: list[Callable[[], None]] = []  # when_read_done callbacks
        self.reading = 0  # reads being handled (nested only when a test feeds reads by hand)
        self.scheduled = False  # a _read_done is due on the loop


_reads = _Reads()


def when_read_done(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the read being handled is done (every frame in it handed over), before its
    writes leave; outside a read, on the next loop turn. For work that should see a whole read's
    answers at once rather than one answer at a time."""
    _reads.after.append(callback)
    _schedule_read_done()


def _schedule_read_done() -> None:
    if not _reads.reading and not _reads.scheduled:
        _reads.scheduled = True
        asyncio.get_event_loop().call_soon(_read_done)


def _read_done() -> None:
    """Run the when_read_done callbacks, then write every connection's pending data: one write each."""
    _reads.scheduled = False
    while _reads.after:
        after, _reads.after = _reads.after, []
        for callback in after:
            try:
                callback()
            except Exception:
                log.exception("uncaught exception in a callback after a read")
    pending, _reads.pending = _reads.pending, []
    for conn in pending:
        conn._flush()


class _Wire(asyncio.Protocol):
    """The asyncio side of one :class:`FastConn`: every read goes straight to it, with no future per read."""

    __slots__ = ("conn",)

    def __init__(self, conn: FastConn):
        self.conn = conn

    def connection_made(self, transport) -> None:
        self.conn._made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn._on_read(data)

    def eof_received(self) -> bool:
        return False  # nsqd closed its side: close ours too

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost(exc)


async def _start_tls(conn: FastConn, context: ssl.SSLContext) -> None:
    """Upgrade ``conn``'s transport to TLS in place; a failure closes it and is reported as pynsq reports one."""
    plain, wire = conn.transport, conn._wire
    if plain is None or wire is None:  # closed before the upgrade began: the close is reported already
        return
    conn.transport = None  # nothing may be written until TLS is up
    try:
        conn.transport = await asyncio.get_running_loop().start_tls(plain, wire, context,
                                                                    server_hostname=conn.host)
    except Exception as e:
        plain.close()
        conn.trigger(event.ERROR, conn=conn, error=protocol.SendError("failed to upgrade to TLS", e))


class FastConn(nsq.AsyncConn):
    """pynsq's ``AsyncConn`` on an asyncio transport, with coalesced writes and batched frame decoding."""

    def __init__(self, *args, output_buffer_size: int = 16 * 1024, **kwargs):
        # nsqd takes -1 for "no output buffering" (every message written at once);
        # pynsq's constructor accepts only sizes >= 0, its IDENTIFY sends whatever is set.
        super().__init__(*args, output_buffer_size=max(output_buffer_size, 0), **kwargs)
        if self.snappy or self.deflate:
            raise ValueError("FastConn does not compress: snappy and deflate are not supported")
        self.output_buffer_size = output_buffer_size
        # set by FastReader: called with (conn, [FastMessage, ...]) per read
        self.on_messages: Callable[[FastConn, list[FastMessage]], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._wire: _Wire | None = None
        self._opening: asyncio.Task | None = None
        self._fast = False
        self._pending: list[bytes] = []
        self._flushed: asyncio.Future | None = None
        self._rbuf = b""  # the start of a frame that the next read completes
        self.on(event.READY, self._enable_fast_io)

    def _enable_fast_io(self, **_) -> None:
        self._fast = True

    # -- the connection ----------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (asynchronously); pynsq's handshake follows from the CONNECT event."""
        if not self.closed():
            return
        self.state = nsq.conn.CONNECTING
        self.on(event.CONNECT, self._on_connect)
        self.on(event.DATA, self._on_data)
        self._opening = asyncio.get_event_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: _Wire(self), self.host, self.port), self.timeout)
        except asyncio.CancelledError:  # close() while connecting
            if self.transport is not None:
                self.transport.close()  # made just now: its connection_lost reports the close
            else:
                self._lost(None)
            raise
        except (TimeoutError, OSError) as e:
            log.warning("[%s] cannot connect to nsqd: %s", self.id, e or "timed out")
            self._lost(e)
        finally:
            self._opening = None

    def _made(self, transport) -> None:
        self.transport, self._wire = transport, transport.get_protocol()
        self.state = nsq.conn.CONNECTED
        transport.write(protocol.MAGIC_V2)
        self.trigger(event.CONNECT, conn=self)

    def _lost(self, exc: Exception | None) -> None:
        if self.state == nsq.conn.DISCONNECTED:
            return
        self.state = nsq.conn.DISCONNECTED
        self.transport = None
        self._pending = []
        flushed, self._flushed = self._flushed, None
        if flushed is not None and not flushed.done():
            flushed.set_exception(StreamClosedError(real_error=exc))
        self.trigger(event.CLOSE, conn=self)

    def close(self) -> None:
        """Close the connection once what was sent so far is written (unlike IOStream, nothing is dropped)."""
        if self._opening is not None:
            self._opening.cancel()
        elif self.transport is not None and not self.transport.is_closing():
            if self._pending:
                self._flush()
            self.transport.close()

    def hold_reads(self, hold: bool) -> None:
        """Stop (True) or resume (False) reading the socket; what nsqd sends meanwhile waits in it."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if hold:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def upgrade_to_tls(self, options=None) -> None:
        """Start TLS on the open connection, as pynsq's does on its IOStream (nsqd answers OK once it is up)."""
        opts = {"cert_reqs": ssl.CERT_REQUIRED, "ssl_version": ssl.PROTOCOL_TLSv1_2, **(options or {})}
        asyncio.get_event_loop().create_task(_start_tls(self, ssl_options_to_context(opts, server_side=False)))

    def upgrade_to_snappy(self) -> None:
        raise nsq.Error("FastConn does not support snappy")

    def upgrade_to_deflate(self) -> None:
        raise nsq.Error("FastConn does not support deflate")

    def _on_message_finish(self, message, **kwargs) -> None:
        # pynsq's, with the FIN frame built directly (its generic command
        # builder type-checks and converts every argument, per message).
        self.trigger(event.RESUME, conn=self)
        self.in_flight -= 1
        try:
            self.write(b"FIN " + message.id + b"\n")
        except Exception as e:
            self.close()
            self.trigger(event.ERROR, conn=self, error=protocol.SendError(f"failed to send FIN {message.id!r}", e))

    def _finish_ids(self, message_ids: list[bytes]) -> None:
        self.trigger(event.RESUME, conn=self)
        self.in_flight -= len(message_ids)
        try:
            self.write(b"FIN " + b"\nFIN ".join(message_ids) + b"\n")
        except Exception as e:
            self.close()
            self.trigger(event.ERROR, conn=self, error=protocol.SendError(f"failed to send {len(message_ids)} FINs", e))

    def _on_data(self, data: bytes, **kwargs) -> None:
        if data[:4] != _FRAME_MESSAGE:
            return super()._on_data(data, **kwargs)
        self.last_recv_timestamp = self.last_msg_timestamp = time.time()
        self.in_flight += 1
        timestamp, attempts = _MESSAGE_HEADER.unpack_from(data, 4)
        message = FastMessage(self, data[14:30], data[30:], timestamp, attempts)
        self.trigger(event.MESSAGE, conn=self, message=message)

    # -- writes ----------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future:
        """Write ``data`` (see :meth:`write`); the future resolves once it is handed to the transport.

        Raises:
            StreamClosedError: the connection is not open.
        """
        self.write(data)
        flushed = self._flushed
        if flushed is None:
            flushed = self._flushed = asyncio.get_event_loop().create_future()
            flushed.add_done_callback(_retrieve)
            if not self._pending:  # written at once (during the handshake)
                flushed.set_result(None)
                self._flushed = None
        return flushed

    def write(self, data: bytes) -> None:
        """Write ``data``: during the handshake at once, then together with whatever else is sent while
        this read is handled (or in this loop iteration, outside a read): one socket write per connection.

        Raises:
            StreamClosedError: the connection is not open.
        """
        if self.transport is None or self.transport.is_closing():
            raise StreamClosedError()
        if not self._fast:
            self.transport.write(data)
            return
        if not self._pending:
            _reads.pending.append(self)
            _schedule_read_done()
        self._pending.append(data)

    def _flush(self) -> None:
        flushed, self._flushed = self._flushed, None
        if not self._pending or self.transport is None:
            return
        data, self._pending = b"".join(self._pending), []
        try:
            self.transport.write(data)
        except Exception as e:
            if flushed is not None:
                flushed.set_exception(e)
            self.close()
            self.trigger(event.ERROR, conn=self, error=protocol.SendError("failed to write", e))
            return
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    # -- reads -----------------------------------------------------------------

    def _on_read(self, chunk: bytes) -> None:
        """Take one read from the socket: hand over every complete frame, keep the rest for the next read.

        What is sent meanwhile, on any connection (a batch handled inline: its MPUB, its FINs), is
        written when the read is done, one write per connection, with no loop turn of its own (see
        :class:`_Reads`).
        """
        self.last_recv_timestamp = time.time()
        data = self._rbuf + chunk if self._rbuf else chunk
        _reads.reading += 1
        try:
            pos = self._read_batched(data) if self.on_messages is not None else self._read_each(data)
        finally:
            _reads.reading -= 1
            if not _reads.reading and (_reads.pending or _reads.after) and not _reads.scheduled:
                _read_done()
        if pos is None:
            self._rbuf = b""
            return  # the stream is corrupt and the connection closed
        self._rbuf = data[pos:]

    def _read_each(self, data: bytes) -> int | None:
        """Hand every complete frame of ``data`` to the data event; return the length consumed (None: corrupt)."""
        pos, end = 0, len(data)
        while end - pos >= 4:
            size = _SIZE.unpack_from(data, pos)[0]
            if size < 0:
                self._corrupt(pos)
                return None
            if end - pos - 4 < size:
                break
            start, pos = pos + 4, pos + 4 + size
            self._on_frame(data[start:pos])
        return pos

    def _corrupt(self, pos: int) -> None:
        self.close()
        self.trigger(event.ERROR, conn=self,
                     error=protocol.IntegrityError(f"negative frame size at byte {pos} of a read"))

    def _on_frame(self, frame: bytes) -> None:
        try:
            self.trigger(event.DATA, conn=self, data=frame)
        except Exception:
            log.exception("[%s] uncaught exception in data event", self.id)

    def _read_batched(self, data: bytes) -> int | None:
        """Hand each run of message frames of ``data`` to ``on_messages``, other frames to the data event.

        Returns the length consumed, or None when a frame size was negative
        (the connection is then closed with an error).
        """
        frames, pos = frame_scanner(), 0
        if frames is None or len(data) < SCAN_MIN_BYTES:
            return self._read_batched_plain(data)
        while True:
            rows, end, valid = frames.scan(data, pos)
            self._dispatch(data, rows)
            if not valid:
                self._corrupt(end)
                return None
            if end == pos or len(rows) < frames.MAX_FRAMES:
                return end
            pos = end

    def _read_batched_plain(self, data: bytes) -> int | None:
        """:meth:`_read_batched` frame by frame in Python, for the time before the compiled scanner is loaded."""
        pos, end = 0, len(data)
        run: list[FastMessage] = []
        while end - pos >= 4:
            size = _SIZE.unpack_from(data, pos)[0]
            if size < 0:
                if run:
                    self._deliver(run)
                self._corrupt(pos)
                return None
            if end - pos - 4 < size:
                break
            start, pos = pos + 4, pos + 4 + size
            if size >= 4 + _MESSAGE_HEADER.size + 16 and data[start:start + 4] == _FRAME_MESSAGE:
                timestamp, attempts = _MESSAGE_HEADER.unpack_from(data, start + 4)
                run.append(FastMessage(self, data[start + 14:start + 30], data[start + 30:pos], timestamp, attempts))
                continue
            if run:  # keep the order of messages and other frames
                self._deliver(run)
                run = []
            self._on_frame(data[start:pos])
        if run:
            self._deliver(run)
        return pos

    def _dispatch(self, data: bytes, rows) -> None:
        frames, first = frame_scanner(), 0
        for i in frames.not_messages(rows) + [len(rows)]:  # keep the order of messages and other frames
            if i > first:
                self._deliver(self._messages(data, rows[first:i]))
            if i < len(rows):
                self._on_frame(data[rows[i, frames.START]:rows[i, frames.END]])
            first = i + 1

    def _messages(self, data: bytes, rows) -> list[FastMessage]:
        """The messages of ``rows`` (message frames of ``data``), built with no Python code per message but __init__."""
        frames = frame_scanner()
        starts = rows[:, frames.START]
        id_starts, body_starts = (starts + 14).tolist(), (starts + 30).tolist()
        ids = list(map(data.__getitem__, map(slice, id_starts, body_starts)))
        bodies = list(map(data.__getitem__, map(slice, body_starts, rows[:, frames.END].tolist())))
        return list(map(FastMessage, repeat(self), ids, bodies, rows[:, frames.TIMESTAMP].tolist(),
                        rows[:, frames.ATTEMPTS].tolist()))

    def _deliver(self, messages: list[FastMessage]) -> None:
        self.last_recv_timestamp = self.last_msg_timestamp = time.time()
        self.in_flight += len(messages)
        try:
            self.on_messages(self, messages)  # type: ignore[misc]  # set: only _on_read's batched path delivers
        except Exception:
            log.exception("[%s] uncaught exception handling %d messages", self.id, len(messages))
