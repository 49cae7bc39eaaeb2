"""``pipeline gateway``: an authenticated HTTP edge compatible with nsqd's ``/pub`` and ``/mpub``.

nsqd's HTTP API has no authentication, so it stays on 127.0.0.1 and users post
here instead, with the same requests plus a bearer token::

    curl -H "Authorization: Bearer $TOKEN" -d '{"number": 7}' 'http://127.0.0.1:4180/pub?topic=numbers'

Each token may publish to its listed topics at its rate. A request is
answered only after nsqd acknowledged it: 200 ``OK``; or a JSON error
``{"status", "error", "message"}`` with 400 (bad request, schema violation
naming the field), 401 (no or unknown token), 403 (topic not allowed), 413
(message or body over nsqd's limits), 429 (over the token's rate) or 503
(nsqd down or silent). An ``/mpub`` is one MPUB, which nsqd accepts or
refuses whole, so a failure publishes none of its messages.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import signal
import struct
import time
from dataclasses import dataclass, field

import nsq
from tornado.concurrent import Future
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler, stream_request_body

from .codecs import decode
from .credentials import read_secret
from .errors import DecodeError, PipelineError, PublishError
from .publisher import Publisher
from .security import client_options
from .topology import split_address

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "object": (dict,), "array": (list,)}
_U32 = struct.Struct(">I")


class GatewayError(PipelineError):
    """Raised when a gateway request must be refused; ``status`` and ``error`` form the HTTP answer."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass
class TokenBucket:
    """Allows ``rate`` messages per second on average and ``burst`` at once; rate 0 allows everything."""

    rate: float
    burst: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.burst

    def take(self, count: int) -> float:
        """Take ``count`` messages' worth; return 0 when allowed, else the seconds to wait before retrying."""
        if self.rate == 0:
            return 0.0
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if count <= self.level:
            self.level -= count
            return 0.0
        return (count - self.level) / self.rate


@dataclass
class Token:
    """One bearer token: its name (for logs), secret, topics and rate bucket."""

    name: str
    secret: bytes
    topics: frozenset[str]
    bucket: TokenBucket


def load_tokens(topology) -> list[Token]:
    """Read every token the topology's gateway section names.

    Raises:
        SecretError: a token's variable is unset or its file is missing or readable by others.
    """
    tokens = []
    for name, spec in topology.gateway.tokens.items():
        secret = read_secret(spec.secret, topology, f"gateway.tokens.{name}.secret")
        burst = spec.burst or max(1, math.ceil(spec.rate))
        tokens.append(Token(name, secret.encode(), frozenset(spec.topics), TokenBucket(spec.rate, burst)))
    return tokens


def schema_violation(record: dict, schema: dict[str, str]) -> str | None:
    """Why ``record`` breaks ``schema`` (field name to type name), or None when it conforms."""
    for name, kind in schema.items():
        if name not in record:
            return f"field {name!r} is required"
        value = record[name]
        if (isinstance(value, bool) and kind != "boolean") or not isinstance(value, _TYPES[kind]):
            return f"field {name!r} must be {'an' if kind[0] in 'aeio' else 'a'} {kind}, got {type(value).__name__}"
    return None


def split_newlines(body: bytes, max_msg_size: int) -> list[bytes]:
    """Messages of an ``/mpub`` body, one per line; empty lines are skipped, as nsqd does."""
    messages = [line for line in body.split(b"\n") if line]
    for i, message in enumerate(messages):
        if len(message) > max_msg_size:
            raise GatewayError(413, "MSG_TOO_BIG", f"message {i} has {len(message)} bytes; the limit is {max_msg_size}")
    return messages


def split_binary(body: bytes, max_msg_size: int) -> list[bytes]:
    """Messages of a ``binary=true`` ``/mpub`` body: a count, then each message's size and bytes (nsqd's format)."""
    if len(body) < 4:
        raise GatewayError(400, "BAD_BODY", "binary body needs a 4-byte message count")
    count, offset, messages = _U32.unpack_from(body)[0], 4, []
    for i in range(count):
        if offset + 4 > len(body):
            raise GatewayError(400, "BAD_BODY", f"binary body ends before message {i} of {count}")
        size = _U32.unpack_from(body, offset)[0]
        if size > max_msg_size:
            raise GatewayError(413, "MSG_TOO_BIG", f"message {i} has {size} bytes; the limit is {max_msg_size}")
        if size == 0 or offset + 4 + size > len(body):
            raise GatewayError(400, "BAD_MESSAGE", f"message {i} is empty or runs past the body's end")
        messages.append(body[offset + 4:offset + 4 + size])
        offset += 4 + size
    if offset != len(body):
        raise GatewayError(400, "BAD_BODY", f"{len(body) - offset} bytes after the last of {count} messages")
    return messages


class Gateway:
    """The gateway's state: tokens, limits, schemas and the connection to nsqd.

    Parameters:
        topology: a loaded topology with a ``gateway`` section.
    """

    def __init__(self, topology):
        self.topology = topology
        self.spec = topology.gateway
        self.tokens = load_tokens(topology)
        self.schemas = {name: t.schema_ for name, t in topology.topics.items() if t.schema_}
        self.publisher = Publisher(topology.nsqd_tcp_addresses(), **client_options(topology, "gateway"))

    def authorize(self, header: str | None, topic: str) -> Token:
        """The token of an ``Authorization`` header, if it may publish to ``topic``.

        Raises:
            GatewayError: 401 without a known bearer token, 403 when the token may not publish to ``topic``.
        """
        scheme, _, credential = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise GatewayError(401, "UNAUTHORIZED", "send 'Authorization: Bearer <token>'")
        given = credential.strip().encode()
        # compare with every token, so the time taken does not tell which one nearly matched
        found = [t for t in self.tokens if hmac.compare_digest(t.secret, given)]
        if not found:
            raise GatewayError(401, "UNAUTHORIZED", "unknown token")
        token = found[0]
        if topic not in token.topics:
            raise GatewayError(403, "FORBIDDEN", f"token {token.name!r} may not publish to topic {topic!r}")
        return token

    def check(self, topic: str, messages: list[bytes]) -> None:
        """Check the messages against the topic's schema and nsqd's MPUB body limit.

        Raises:
            GatewayError: 400 naming the message and field, or 413 when the MPUB would be too big.
        """
        if not messages:
            raise GatewayError(400, "MSG_EMPTY", "no message in the body")
        framed = 4 + sum(4 + len(m) for m in messages)
        if framed > self.spec.max_body_size:
            raise GatewayError(413, "BODY_TOO_BIG", f"{len(messages)} messages make an MPUB of {framed} bytes; "
                                                    f"the limit is {self.spec.max_body_size}")
        schema = self.schemas.get(topic)
        if schema is None:
            return
        for i, message in enumerate(messages):
            try:
                reason = schema_violation(decode(message), schema)
            except DecodeError as e:
                reason = e.reason
            if reason is not None:
                where = f"message {i}: " if len(messages) > 1 else ""
                raise GatewayError(400, "SCHEMA", f"{where}{reason}")

    async def publish(self, topic: str, messages: list[bytes]) -> None:
        """Publish ``messages`` in one MPUB and wait for nsqd's OK.

        Raises:
            GatewayError: 503 when no nsqd is connected, it refuses, or it does not answer in time.
        """
        if not self.publisher.connected():
            raise GatewayError(503, "NSQD_UNAVAILABLE", "no connection to nsqd; nothing was published")
        future: Future = Future()

        def on_answer(conn, data) -> None:
            if not future.done():
                future.set_result(data)

        self.publisher.writer.mpub(topic, messages, callback=on_answer)
        try:
            answer = await asyncio.wait_for(future, self.spec.publish_timeout)
        except asyncio.TimeoutError:
            raise GatewayError(503, "NSQD_TIMEOUT", f"no answer from nsqd within {self.spec.publish_timeout:g}s;"
                                                    " the messages may or may not have been published") from None
        if isinstance(answer, nsq.Error):
            raise GatewayError(503, "NSQD_ERROR", f"nsqd did not accept the messages: {answer}")

    def application(self) -> Application:
        """The tornado application serving ``/pub``, ``/mpub`` and ``/ping``."""
        return Application([
            (r"/pub", PublishHandler, {"gateway": self, "multi": False}),
            (r"/mpub", PublishHandler, {"gateway": self, "multi": True}),
            (r"/ping", PingHandler, {"gateway": self}),
        ])


class PingHandler(RequestHandler):
    """``GET /ping``: 200 ``OK`` while nsqd is connected, else 503."""

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def get(self) -> None:
        if not self.gateway.publisher.connected():
            self.set_status(503)
            self.finish("NOK - no connection to nsqd")
            return
        self.finish("OK")


@stream_request_body
class PublishHandler(RequestHandler):
    """``POST /pub?topic=`` (one message) and ``POST /mpub?topic=[&binary=true]`` (many)."""

    def initialize(self, gateway: Gateway, multi: bool) -> None:
        self.gateway, self.multi = gateway, multi
        self.limit = gateway.spec.max_body_size if multi else gateway.spec.max_msg_size
        self.chunks: list[bytes] = []
        self.size = 0

    def prepare(self) -> None:
        # Checked before the body is read, so an unauthorised client cannot make us buffer anything.
        try:
            if self.request.method not in ("POST", "PUT"):
                raise GatewayError(405, "METHOD_NOT_ALLOWED", "use POST")
            self.topic = self.get_query_argument("topic", "")
            if not self.topic:
                raise GatewayError(400, "MISSING_ARG_TOPIC", "the topic query argument is required")
            self.token = self.gateway.authorize(self.request.headers.get("Authorization"), self.topic)
            length = int(self.request.headers.get("Content-Length", "0") or 0)
            if length > self.limit:
                raise self._too_big(length)
        except GatewayError as e:
            self.fail(e)
            return
        # Let tornado read past our limit, so we answer 413 rather than it closing with a 400.
        self.request.connection.set_max_body_size(2 * self.limit + 65536)

    def _too_big(self, size: int) -> GatewayError:
        if self.multi:
            return GatewayError(413, "BODY_TOO_BIG", f"body of {size}+ bytes; the limit is {self.limit}")
        return GatewayError(413, "MSG_TOO_BIG", f"message of {size}+ bytes; the limit is {self.limit}")

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.chunks.append(chunk)

    async def post(self) -> None:
        try:
            if self.size > self.limit:
                raise self._too_big(self.size)
            messages = self._messages(b"".join(self.chunks))
            self.gateway.check(self.topic, messages)
            bucket = self.token.bucket
            if bucket.rate and len(messages) > bucket.burst:
                raise GatewayError(429, "RATE_LIMITED", f"{len(messages)} messages are more than token "
                                                        f"{self.token.name!r} may send at once ({bucket.burst:g});"
                                                        " split the /mpub")
            wait = bucket.take(len(messages))
            if wait:
                self.set_header("Retry-After", str(math.ceil(wait)))
                raise GatewayError(429, "RATE_LIMITED", f"token {self.token.name!r} is over its rate; "
                                                        f"retry in {wait:.2f}s")
            await self.gateway.publish(self.topic, messages)
        except GatewayError as e:
            self.fail(e)
            return
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("OK")

    put = post

    def _messages(self, body: bytes) -> list[bytes]:
        if not self.multi:
            return [body] if body else []
        if self.get_query_argument("binary", "false").lower() in ("true", "1"):
            return split_binary(body, self.gateway.spec.max_msg_size)
        return split_newlines(body, self.gateway.spec.max_msg_size)

    def fail(self, error: GatewayError) -> None:
        """Answer with ``error`` as JSON."""
        if error.status >= 500:
            log.warning("refused %s?topic=%s: %s", self.request.path, getattr(self, "topic", ""), error.message)
        self.set_status(error.status)
        if error.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="nsq-pipeline"')
        self.finish({"status": error.status, "error": error.error, "message": error.message})


async def serve(topology, *, ready=None) -> None:
    """Run the gateway until SIGTERM or SIGINT; ``ready()`` is called once it listens."""
    # One INFO line per request would cost more than the request; refusals still log (4xx/5xx are warnings).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    gateway = Gateway(topology)
    try:
        await gateway.publisher.wait_connected(CONNECT_TIMEOUT)
    except PublishError as e:
        log.warning("%s; starting anyway, answering 503 until it connects", e)
    host, port = split_address(topology.gateway.http)
    server = HTTPServer(gateway.application(), max_body_size=2 * topology.gateway.max_body_size + 65536)
    # reuse_port: the `processes` replicas supervisord starts share the port; the kernel spreads connections
    server.add_sockets(bind_sockets(port, address=host.strip("[]"), reuse_port=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway listening on http://%s, publishing to %s", topology.gateway.http,
             ", ".join(topology.nsqd_tcp_addresses()))
    if ready is not None:
        ready()
    await stop.wait()
    server.stop()
    await server.close_all_connections()
    gateway.publisher.close()
