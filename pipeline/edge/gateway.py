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

This module holds what a request is checked against (tokens, rates, schemas,
nsqd's limits); :mod:`pipeline.edge.gateway_http` is the HTTP server (and ``serve()``,
which runs it) and :mod:`pipeline.edge.gateway_batch` publishes the requests of one IOLoop iteration
to a topic as one MPUB.
"""
from __future__ import annotations

import hmac
import logging
import math
import struct
import time
from dataclasses import dataclass, field

from pipeline.client.publisher import Publisher
from pipeline.config.credentials import read_secret
from pipeline.config.security import client_options
from pipeline.errors import DecodeError, GatewayError
from pipeline.records.codecs import decode

log = logging.getLogger(__name__)

_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "object": (dict,), "array": (list,)}
_U32 = struct.Struct(">I")


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
        self.publisher = Publisher(topology.nsqd_tcp_addresses(), placement=topology.placement,
                                   **client_options(topology, "gateway"))

    def authorize(self, header: bytes | None, topic: str) -> Token:
        """The token of an ``Authorization`` header, if it may publish to ``topic``.

        Raises:
            GatewayError: 401 without a known bearer token, 403 when the token may not publish to ``topic``.
        """
        scheme, _, credential = (header or b"").partition(b" ")
        given = credential.strip()
        if scheme.lower() != b"bearer" or not given:
            raise GatewayError(401, "UNAUTHORIZED", "send 'Authorization: Bearer <token>'")
        # compare with every token, so the time taken does not tell which one nearly matched
        found = [t for t in self.tokens if hmac.compare_digest(t.secret, given)]
        if not found:
            raise GatewayError(401, "UNAUTHORIZED", "unknown token")
        token = found[0]
        if topic not in token.topics:
            raise GatewayError(403, "FORBIDDEN", f"token {token.name!r} may not publish to topic {topic!r}")
        return token

    def check(self, topic: str, messages: list[bytes]) -> int:
        """Check the messages against the topic's schema and nsqd's MPUB body limit; return their MPUB size.

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
            return framed
        for i, message in enumerate(messages):
            try:
                reason = schema_violation(decode(message), schema)
            except DecodeError as e:
                reason = e.reason
            if reason is not None:
                where = f"message {i}: " if len(messages) > 1 else ""
                raise GatewayError(400, "SCHEMA", f"{where}{reason}")
        return framed

    def admit(self, token: Token, count: int) -> None:
        """Take ``count`` messages from the token's rate bucket.

        Raises:
            GatewayError: 429 (with ``Retry-After``) when the token is over its rate or ``count`` exceeds its burst.
        """
        bucket = token.bucket
        if not bucket.rate:
            return
        if count > bucket.burst:
            raise GatewayError(429, "RATE_LIMITED", f"{count} messages are more than token {token.name!r} may "
                                                    f"send at once ({bucket.burst:g}); split the /mpub")
        wait = bucket.take(count)
        if wait:
            raise GatewayError(429, "RATE_LIMITED", f"token {token.name!r} is over its rate; retry in {wait:.2f}s",
                               headers={"Retry-After": str(math.ceil(wait))})

    def messages(self, multi: bool, binary: bool, body: bytes) -> list[bytes]:
        """The messages of a ``/pub`` (the body) or ``/mpub`` (newline or ``binary=true``) body.

        Raises:
            GatewayError: 400 for a malformed binary body, 413 for a message over ``max_msg_size``.
        """
        if not multi:
            return [body] if body else []
        if binary:
            return split_binary(body, self.spec.max_msg_size)
        return split_newlines(body, self.spec.max_msg_size)
