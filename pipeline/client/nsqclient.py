"""A small blocking NSQ TCP publisher for producers, scripts and tests.

Producers run outside the tornado runtime and want one simple thing: send a
chunk of messages with MPUB and know that nsqd acknowledged it. Several MPUBs
are pipelined on the socket (nsqd answers them in order), so a producer is not
bound by one round trip per chunk.

Example::

    with NsqPublisher("127.0.0.1:4150") as pub:
        pub.mpub("numbers", [b'{"number": 7}'])   # returns after nsqd's OK
"""
from __future__ import annotations

import json
import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence

from pipeline.config import socket_address
from pipeline.errors import PublishError, PublishRefused

MAGIC_V2 = b"  V2"
FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE = 0, 1, 2
# nsqd's default for --max-body-size; chunks stay below it and below MAX_MSG_SIZE.
MAX_BODY_SIZE = 5 * 1024 * 1024
_SIZE = struct.Struct(">l")
_U32 = struct.Struct(">I")


def encode_mpub(topic: str, bodies: Sequence[bytes]) -> bytes:
    """Return the MPUB command frame for ``bodies``."""
    parts: list = [None] * (2 * len(bodies))
    parts[0::2] = map(_U32.pack, map(len, bodies))  # size, body, size, body ... without a Python loop
    parts[1::2] = bodies
    payload = _U32.pack(len(bodies)) + b"".join(parts)
    return b"MPUB " + topic.encode() + b"\n" + _U32.pack(len(payload)) + payload


def chunked(bodies: Sequence[bytes], max_count: int, max_bytes: int = MAX_BODY_SIZE - 4096):
    """Yield slices of ``bodies`` with at most ``max_count`` items and ``max_bytes`` payload."""
    if len(bodies) <= max_count and sum(map(len, bodies)) + 4 * len(bodies) <= max_bytes:
        if bodies:
            yield bodies  # the common case, decided without a Python loop
        return
    start, size = 0, 0
    for i, body in enumerate(bodies):
        cost = len(body) + 4
        if i > start and (i - start >= max_count or size + cost > max_bytes):
            yield bodies[start:i]
            start, size = i, 0
        size += cost
    if start < len(bodies):
        yield bodies[start:]


class _Connection:
    """A blocking NSQ TCP connection: connect, send commands, read frames.

    With ``security`` (a :class:`pipeline.config.security.ClientSecurity`) it sends
    IDENTIFY, upgrades to TLS and sends AUTH as nsqd asks, before anything else;
    ``identify`` adds fields to the IDENTIFY (and sends one without ``security``),
    such as ``msg_timeout``.
    """

    def __init__(self, address: str, timeout: float, security=None, identify: dict | None = None):
        self.address = address
        try:
            self._sock = socket.create_connection(socket_address(address), timeout=timeout)
        except OSError as e:
            raise PublishError(f"cannot connect to nsqd at {address}: {e}") from e
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._send(MAGIC_V2)
        if identify or (security is not None and security.active):
            try:
                self._negotiate(security, identify or {})
            except BaseException:
                self.close()
                raise

    def _negotiate(self, security, fields: dict) -> None:
        tls = security is not None and security.ssl_context is not None
        identify = json.dumps({"feature_negotiation": True, "tls_v1": tls, "user_agent": "nsq-pipeline",
                               **fields}).encode()
        self._send(b"IDENTIFY\n" + _U32.pack(len(identify)) + identify)
        features = self._expect("IDENTIFY")
        features = json.loads(features) if features.startswith(b"{") else {}
        if tls and not features.get("tls_v1"):
            raise PublishError(f"nsqd at {self.address} does not offer TLS (start it with --tls-cert/--tls-key)")
        if tls:
            host = socket_address(self.address)[0]
            try:
                self._sock = security.ssl_context.wrap_socket(self._sock, server_hostname=host)
            except OSError as e:
                raise PublishError(f"TLS with nsqd at {self.address} failed: {e}") from e
            self._expect("TLS upgrade")
        if features.get("auth_required"):
            if security is None or not security.secret:
                raise PublishError(f"nsqd at {self.address} requires AUTH and this client has no secret")
            secret = security.secret.encode()
            self._send(b"AUTH\n" + _U32.pack(len(secret)) + secret)
            self._expect("AUTH")

    def _expect(self, what: str) -> bytes:
        frame, data = self._read_frame()
        if frame != FRAME_RESPONSE:
            raise PublishError(f"{what} refused by nsqd at {self.address}: {data.decode(errors='replace')}")
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise PublishError(f"nsqd at {self.address}: send failed: {e}") from e

    def _read_frame(self) -> tuple[int, bytes]:
        # Nothing is consumed until the whole frame is buffered, so a read that
        # times out half-way leaves the stream intact for the next call.
        self._fill(4)
        size = _SIZE.unpack_from(self._buf)[0]
        self._fill(4 + size)
        frame = _SIZE.unpack_from(self._buf, 4)[0]
        data = bytes(self._buf[8:4 + size])
        del self._buf[:4 + size]
        return frame, data

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except OSError as e:
                raise PublishError(f"nsqd at {self.address}: no answer: {e}") from e
            if not chunk:
                raise PublishError(f"nsqd at {self.address} closed the connection")
            self._buf += chunk


class NsqPublisher(_Connection):
    """A blocking connection to one nsqd that publishes and waits for OK.

    Parameters:
        address: nsqd's TCP address, ``host:port``.
        timeout: seconds to wait for connect and for each answer.
        window: MPUB commands sent before waiting for the oldest answer.
    """

    def __init__(self, address: str, timeout: float = 10.0, window: int = 8, security=None):
        super().__init__(address, timeout, security)
        self.window = max(1, window)
        self._pending: deque[int] = deque()
        self.acked = 0  # messages nsqd has acknowledged on this connection

    def mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish ``bodies`` in one MPUB and wait for nsqd's OK."""
        self.send_mpub(topic, bodies)
        self.flush()

    def publish(self, topic: str, bodies: Sequence[bytes], chunk: int = 500) -> int:
        """Publish ``bodies`` in pipelined MPUB chunks; return how many were acknowledged."""
        for part in chunked(bodies, chunk):
            self.send_mpub(topic, part)
        self.flush()
        return len(bodies)

    def send_mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Send one MPUB without waiting, keeping at most ``window`` unanswered."""
        if not bodies:
            return
        while len(self._pending) >= self.window:
            self._await_ok()
        self._send(encode_mpub(topic, bodies))
        self._pending.append(len(bodies))

    def flush(self) -> int:
        """Wait for every outstanding answer; return how many messages they acknowledged."""
        acked = 0
        while self._pending:
            acked += self._await_ok()
        return acked

    def await_answer(self) -> int:
        """Wait for the oldest outstanding answer; return how many messages its OK acknowledged.

        Raises:
            PublishRefused: nsqd answered with an error frame.
            PublishError: the connection closed or no answer came within the timeout.
        """
        return self._await_ok()

    @property
    def outstanding(self) -> int:
        """MPUB commands sent and not answered yet."""
        return len(self._pending)

    def _await_ok(self) -> int:
        while True:
            frame, data = self._read_frame()
            if frame == FRAME_RESPONSE and data == b"_heartbeat_":
                self._send(b"NOP\n")
                continue
            count = self._pending.popleft()
            if frame == FRAME_RESPONSE and data == b"OK":
                self.acked += count
                return count
            raise PublishRefused(f"nsqd at {self.address} refused a publish: {data.decode(errors='replace')}")


def publish_records(address: str, topic: str, bodies: Iterable[bytes], chunk: int = 500) -> int:
    """Connect, publish every body in MPUB chunks, wait for all OKs; return the count."""
    items = list(bodies)
    with NsqPublisher(address) as pub:
        return pub.publish(topic, items, chunk)


class NsqMessage:
    """One message received by :class:`NsqSubscriber`."""

    __slots__ = ("id", "timestamp", "attempts", "body")

    def __init__(self, frame: bytes):
        self.timestamp = struct.unpack(">q", frame[:8])[0]
        self.attempts = struct.unpack(">H", frame[8:10])[0]
        self.id = frame[10:26]
        self.body = frame[26:]


class NsqSubscriber(_Connection):
    """A blocking consumer of one topic/channel on one nsqd that FINs what it yields.

    For tools and tests that read a topic in order of arrival (``pipeline
    tail``, checkers); stages use the batched tornado runtime instead.

    Example::

        with NsqSubscriber("127.0.0.1:4150", "prime", "tail#ephemeral") as sub:
            for message in sub.messages(timeout=1.0):
                print(message.body)
    """

    def __init__(self, address: str, topic: str, channel: str, rdy: int = 1000, timeout: float = 10.0,
                 security=None):
        super().__init__(address, timeout, security)
        self._send(b"SUB " + topic.encode() + b" " + channel.encode() + b"\n")
        frame, data = self._read_frame()
        if frame != FRAME_RESPONSE or data != b"OK":
            self.close()
            raise PublishError(f"SUB {topic}/{channel} refused by {address}: {data.decode(errors='replace')}")
        self._send(b"RDY %d\n" % rdy)

    def messages(self, timeout: float):
        """Yield messages (FINished on yield) until none arrives for ``timeout`` seconds.

        Raises:
            PublishError: nsqd closed the connection or sent an error frame.
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
                self._send(b"FIN " + message.id + b"\n")
                yield message
            elif frame == FRAME_RESPONSE and data == b"_heartbeat_":
                self._send(b"NOP\n")
            elif frame == FRAME_ERROR:
                raise PublishError(f"nsqd error: {data.decode(errors='replace')}")
