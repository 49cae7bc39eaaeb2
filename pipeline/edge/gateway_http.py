"""The gateway's HTTP/1.1 server: tornado's ``TCPServer`` and ``IOStream``, requests parsed by ``httptools``.

tornado's ``HTTPServer`` answers a connection's pipelined requests one at a
time, each through a ``RequestHandler`` (about half a millisecond of CPU per
request here). This server reads whatever a connection sent, lets ``httptools``
(the llhttp binding uvicorn uses) parse every complete request in it, checks
each one, and hands those that pass to the :class:`~pipeline.edge.gateway_batch.Coalescer`,
which publishes each topic's requests of one IOLoop iteration as one MPUB.
Answers go back in request order, all the ready ones of a connection in one
write. :func:`serve` runs the server for a topology (``pipeline gateway``).

Checked from the headers, before any body is kept: method, topic, token and
``Content-Length`` (413 beyond the limit; a body over
:data:`DISCARD_LIMIT` times the limit, or one the client waits to send after
``Expect: 100-continue``, is not read: the answer closes the connection).
Chunked bodies are accepted, as nsqd's Go server does, and answered 413 (and
the connection closed) once they pass the limit. A connection with
:data:`MAX_UNANSWERED` unanswered requests, or more than ``max_body_size``
bytes of bodies held, or whose answers are not being read, is not read
further until that drains.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from http import HTTPStatus
from urllib.parse import unquote_plus

import httptools
import orjson
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from pipeline.config import socket_address
from pipeline.edge.gateway import Gateway, Token
from pipeline.edge.gateway_batch import Coalescer
from pipeline.errors import GatewayError, PublishError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
READ_CHUNK = 65536
MAX_UNANSWERED = 256
DISCARD_LIMIT = 2  # a refused body up to this many times its limit is read and dropped, keeping the connection
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PLAIN = "text/plain; charset=utf-8"


def render(status: int, body: bytes, content_type: str, connection: bytes | None = None,
           headers: dict[str, str] | None = None) -> bytes:
    """One complete HTTP/1.1 response."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if connection is not None:
        lines.append(f"Connection: {connection.decode()}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


_OK = {c: render(200, b"OK", _PLAIN, c) for c in (None, b"close", b"keep-alive")}


def error_response(error: GatewayError, connection: bytes | None) -> bytes:
    """The JSON answer to a refused request."""
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="nsq-pipeline"'
    body = orjson.dumps({"status": error.status, "error": error.error, "message": error.message})
    return render(error.status, body, "application/json; charset=UTF-8", connection, headers)


def query_args(query: bytes) -> dict[str, str]:
    """The arguments of a query string (the last value of a repeated name wins, as tornado's did)."""
    args = {}
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if b"%" in part or b"+" in part:
            args[unquote_plus(name.decode("latin-1"))] = unquote_plus(value.decode("latin-1"))
        else:
            args[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return args


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing the rest of what was read."""


class Request:
    """One request of a connection, from its first byte until its answer is written."""

    __slots__ = ("conn", "url", "authorization", "length", "expect", "connection", "multi", "binary", "topic",
                 "token", "limit", "chunks", "size", "discard", "response")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.url = b""
        self.authorization: bytes | None = None
        self.length = 0
        self.expect = False
        self.connection: bytes | None = None  # the Connection header of the answer
        self.multi = self.binary = False
        self.topic = ""
        self.token: Token | None = None
        self.limit = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.discard = False  # answered from its headers; its body is read and dropped
        self.response: bytes | None = None

    def succeed(self) -> None:
        """Answer 200 ``OK``."""
        self.conn.answer(self, _OK[self.connection])

    def fail(self, error: GatewayError) -> None:
        """Answer with ``error`` as JSON."""
        self.conn.answer(self, error_response(error, self.connection))


class Connection:
    """One client connection: reads, parses and checks its requests, and writes their answers in order.

    It is the ``httptools`` parser's protocol object: the ``on_*`` methods are the parser's callbacks.
    """

    def __init__(self, server: GatewayServer, stream: IOStream):
        self.server, self.gateway, self.stream = server, server.gateway, stream
        self.parser = httptools.HttpRequestParser(self)
        self.unanswered: deque[Request] = deque()
        self.held = 0  # body bytes of unanswered requests
        # The request being parsed. None only between requests: llhttp calls on_message_begin before any other
        # callback of a request, so every callback below sees a Request.
        self.request: Request = None  # type: ignore[assignment]  # see above
        self.closing = False  # read nothing more; close once every answer is written
        self.resume: asyncio.Future | None = None
        self.writing: asyncio.Future | None = None
        self.flushing = False  # a flush() is scheduled
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Read and parse until the client closes, or a request ends the connection."""
        stream = self.stream
        try:
            while not self.closing:
                if len(self.unanswered) >= MAX_UNANSWERED or self.held > self.gateway.spec.max_body_size:
                    self.resume = self.loop.create_future()
                    await self.resume
                elif self.writing is not None and not self.writing.done():
                    await self.writing  # the client is not reading its answers: read no more requests
                else:
                    self.feed(await stream.read_bytes(READ_CHUNK, partial=True))
        except StreamClosedError:
            self.closing = True

    def feed(self, data: bytes) -> None:
        """Parse ``data``; every request it completes is checked and published or answered."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self.closing:  # not our _Stop: a bug in a callback
                log.exception("gateway request handling failed")
                self._bad_request("the gateway failed on this request")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._bad_request(f"malformed HTTP request: {e}")

    def _bad_request(self, message: str) -> None:
        request = self.request
        if request is None or request.response is not None:  # between requests, or one answered from its headers
            request = Request(self)
            self.unanswered.append(request)
        self.request = None  # type: ignore[assignment]  # between requests
        request.connection = b"close"
        self.close_when_answered()
        request.fail(GatewayError(400, "BAD_REQUEST", message))

    # the parser's callbacks

    def on_message_begin(self) -> None:
        self.request = Request(self)
        self.unanswered.append(self.request)

    def on_url(self, url: bytes) -> None:
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"authorization":
            self.request.authorization = value
        elif name == b"content-length":
            self.request.length = int(value)  # llhttp accepts digits only
        elif name == b"expect":
            self.request.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        request, parser = self.request, self.parser
        if not parser.should_keep_alive():
            request.connection = b"close"
        elif parser.get_http_version() == "1.0":
            request.connection = b"keep-alive"
        try:
            self.route(request)
        except GatewayError as e:
            request.discard = True
            if request.expect or request.length > DISCARD_LIMIT * max(request.limit, 65536):
                request.connection = b"close"  # its body is not coming, or too big to read and drop
                self.close_when_answered()
            request.fail(e)
            if self.closing:
                raise _Stop from None

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request.discard:
            return
        size = request.size + len(body)
        if size > request.limit:  # a chunked body (Content-Length was checked from the headers)
            request.discard, request.connection = True, b"close"
            self.close_when_answered()
            request.fail(self._too_big(request, size))
            raise _Stop
        request.size = size
        request.chunks.append(body)
        self.held += len(body)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None  # type: ignore[assignment]  # between requests
        if not request.discard:
            self.publish(request)
        if request.connection == b"close":
            self.close_when_answered()
            raise _Stop

    # requests

    def route(self, request: Request) -> None:
        """Check a request from its headers; answer ``/ping`` at once.

        Raises:
            GatewayError: 404, 405, 400 (no topic), 401/403 (token) or 413 (Content-Length over the limit).
        """
        path, _, query = request.url.partition(b"?")
        if not path.startswith(b"/"):  # absolute-form (http://host/pub?...), which HTTP/1.1 servers must take
            try:
                url = httptools.parse_url(request.url)
            except httptools.HttpParserInvalidURLError:
                raise GatewayError(400, "BAD_REQUEST", "malformed request target") from None
            path, query = url.path or b"", url.query or b""
        method = self.parser.get_method()
        if path in (b"/pub", b"/mpub"):
            if method not in (b"POST", b"PUT"):
                raise GatewayError(405, "METHOD_NOT_ALLOWED", "use POST")
            args = query_args(query)
            request.topic = topic = args.get("topic", "")
            if not topic:
                raise GatewayError(400, "MISSING_ARG_TOPIC", "the topic query argument is required")
            request.multi = multi = path == b"/mpub"
            spec = self.gateway.spec
            request.limit = spec.max_body_size if multi else spec.max_msg_size
            request.token = self.gateway.authorize(request.authorization, topic)
            if request.length > request.limit:
                raise self._too_big(request, request.length)
            request.binary = args.get("binary", "false").lower() in ("true", "1")
            if request.expect and self.unanswered[0] is request:
                self.stream.write(CONTINUE)
        elif path == b"/ping":
            if method != b"GET":
                raise GatewayError(405, "METHOD_NOT_ALLOWED", "use GET")
            request.discard = True
            if self.gateway.publisher.connected():
                self.answer(request, render(200, b"OK", _PLAIN, request.connection))
            else:
                self.answer(request, render(503, b"NOK - no connection to nsqd", _PLAIN, request.connection))
        else:
            raise GatewayError(404, "NOT_FOUND", "the gateway serves /pub, /mpub and /ping")

    @staticmethod
    def _too_big(request: Request, size: int) -> GatewayError:
        if request.multi:
            return GatewayError(413, "BODY_TOO_BIG", f"body of {size}+ bytes; the limit is {request.limit}")
        return GatewayError(413, "MSG_TOO_BIG", f"message of {size}+ bytes; the limit is {request.limit}")

    def publish(self, request: Request) -> None:
        """Check a complete request's messages and join it to its topic's batch, or answer its error."""
        chunks = request.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        gateway = self.gateway
        try:
            messages = gateway.messages(request.multi, request.binary, body)
            framed = gateway.check(request.topic, messages)
            gateway.admit(request.token, len(messages))  # type: ignore[arg-type]  # route() set it: it was routed
        except GatewayError as e:
            request.fail(e)
            return
        self.server.coalescer.add(request.topic, messages, framed, request)

    def answer(self, request: Request, response: bytes) -> None:
        """Record ``request``'s answer; on the next IOLoop iteration, write every answer that is next in order.

        Waiting one iteration lets the answers of a whole MPUB leave in one write per connection.
        """
        request.response = response
        self.held -= request.size
        request.chunks = []  # the body is not needed any more
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the answers that are next in order, in one write; resume reading if it waited."""
        self.flushing = False
        unanswered = self.unanswered
        out: list[bytes] = []
        while unanswered and unanswered[0].response is not None:
            out.append(unanswered.popleft().response)  # type: ignore[arg-type]  # not None: checked above
        stream = self.stream
        if out and not stream.closed():
            self.writing = stream.write(out[0] if len(out) == 1 else b"".join(out))
            if self.closing and not unanswered:
                self.writing.add_done_callback(lambda _: stream.close())
        resume = self.resume
        if resume is not None and not resume.done():
            resume.set_result(None)  # run() checks its limits again

    def close_when_answered(self) -> None:
        """Read no more requests; close the connection once every answer is written."""
        self.closing = True
        if not self.unanswered:  # otherwise flush() closes it after the last answer
            stream = self.stream
            if self.writing is None or self.writing.done():
                stream.close()
            else:
                self.writing.add_done_callback(lambda _: stream.close())


class GatewayServer(TCPServer):
    """Accepts connections and runs a :class:`Connection` for each.

    Parameters:
        gateway: tokens, limits, schemas and the publisher.
    """

    def __init__(self, gateway: Gateway):
        super().__init__(read_chunk_size=READ_CHUNK)
        self.gateway = gateway
        self.coalescer = Coalescer(gateway.publisher, gateway.spec.max_body_size, gateway.spec.publish_timeout)
        self.connections: set[Connection] = set()

    async def handle_stream(self, stream: IOStream, address) -> None:
        stream.set_nodelay(True)  # answers are small and their clients wait for them
        conn = Connection(self, stream)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def shut_down(self, grace: float) -> None:
        """Stop accepting, give the requests already published up to ``grace`` s for nsqd's answers, then close."""
        self.stop()
        deadline = time.monotonic() + grace
        while not self.coalescer.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.stream.close()


async def serve(topology, *, ready=None) -> None:
    """Run the gateway until SIGTERM or SIGINT; ``ready()`` is called once it listens."""
    gateway = Gateway(topology)
    try:
        await gateway.publisher.wait_connected(CONNECT_TIMEOUT)
    except PublishError as e:
        log.warning("%s; starting anyway, answering 503 until it connects", e)
    host, port = socket_address(topology.gateway.http)
    server = GatewayServer(gateway)
    # reuse_port: the `processes` replicas supervisord starts share the port; the kernel spreads connections
    server.add_sockets(bind_sockets(port, address=host, reuse_port=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway listening on http://%s, publishing to %s", topology.gateway.http,
             ", ".join(topology.nsqd_tcp_addresses()))
    if ready is not None:
        ready()
    await stop.wait()
    await server.shut_down(topology.gateway.publish_timeout)
    gateway.publisher.close()
