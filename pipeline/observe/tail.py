"""Print the records published to a topic, one compact JSON object a line (``pipeline tail``).

The topic is read through a fresh ephemeral channel on every nsqd of the
topology (every partition of a partitioned topic), the way ``nsq_tail`` does:
nsqd deletes the channel when the tail disconnects, and every durable channel
keeps its messages, since each channel gets its own copy. On a topic without
a durable channel, the tail first creates the durable channel ``keep``
(:func:`pipeline.ops.keep.ensure_kept`; one line on ``err``): an ephemeral
channel would otherwise take the topic's whole backlog, and lose it on exit.
Like ``nsq_tail``, the tail only sees messages published after its channel was
created; when none comes within :data:`QUIET_NOTE` seconds it says, once, how
many are already queued and where (``pipeline peek`` shows those). Example::

    from pipeline.observe.tail import tail_topic
    from pipeline.config import load_topology

    tail_topic(load_topology("topology.yaml"), "prime", count=10, out=sys.stdout)

Records are printed with their keys in the order they were received. Values
JSON cannot hold are rendered readably: bytes (msgpack ``bin``) as their
base64 string, anything else (msgpack extension types, timestamps) as its
``repr`` string. A body that is neither a JSON object nor a msgpack map prints
``# undecodable message <id>: <reason>`` and the tail goes on.
"""
from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any, TextIO

import orjson

from pipeline.client.nsqclient import NsqMessage, NsqSubscriber
from pipeline.client.nsqd_http import NsqdHTTPError
from pipeline.config.security import client_security
from pipeline.errors import DecodeError
from pipeline.ops.keep import ensure_kept, queued_note, topic_states
from pipeline.records import envelope
from pipeline.records.codecs import decode

#: Seconds each nsqd is waited on per turn, so a quiet node delays the others little.
READ_TIMEOUT = 0.05
#: Messages taken from one nsqd per turn, so a busy node does not starve the others.
BURST = 100
#: Messages nsqd may push to the tail before it FINishes them (RDY).
TAIL_RDY = 200
#: Seconds without a record before the tail says it is waiting, and where the queued messages are.
QUIET_NOTE = 1.0

_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def tail_channel() -> str:
    """Return a fresh ephemeral channel name, ``tail-<16 hex digits>#ephemeral``."""
    return f"tail-{secrets.token_hex(8)}#ephemeral"


def tail_topic(topology, topic: str, *, count: int | None, out: TextIO, timeout: float | None = None,
               err: TextIO | None = None) -> int:
    """Print the records of ``topic`` to ``out`` as they arrive; return how many were printed.

    Parameters:
        topology: the :class:`~pipeline.config.topology.Topology`; every nsqd in it is read.
        topic: the topic to read; it need not be declared (dead-letter topics are not).
        count: stop after this many records; None follows until Ctrl-C.
            Undecodable messages are reported but not counted.
        out: where the lines go; flushed after each one, so a pipe sees them at once.
        timeout: overall deadline in seconds (for scripts and tests); None: no deadline.
        err: where the notes go (a ``keep`` channel created, waiting); default stderr.

    Raises:
        PublishError: an nsqd cannot be reached or refuses the subscription, or
            drops the connection while the tail runs.
        NsqdHTTPError: an nsqd's HTTP API does not answer.
    """
    err = err if err is not None else sys.stderr
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    states = ensure_kept(topology, topic, log=lambda line: _note(err, line))
    channel = tail_channel()
    subscribers: list[NsqSubscriber] = []
    printed, noted = 0, False
    try:
        for state in states:
            subscribers.append(NsqSubscriber(state.tcp, state.topic, channel, rdy=TAIL_RDY,
                                             security=client_security(topology, "tail")))
        while (count is None or printed < count) and (deadline is None or time.monotonic() < deadline):
            for sub in subscribers:
                wanted = BURST if count is None else min(BURST, count - printed)
                for is_record in _print_burst(sub, wanted, out):
                    printed += is_record  # counted line by line, so Ctrl-C mid-burst returns the true count
                if count is not None and printed >= count:
                    break
            if not printed and not noted and time.monotonic() - started >= QUIET_NOTE:
                noted = True
                _note(err, _waiting(topology, topic))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a follow ends; the count printed so far is the answer
    finally:
        for sub in subscribers:
            sub.close()  # nsqd deletes the ephemeral channel once its last client is gone
    return printed


def _waiting(topology, topic: str) -> str:
    try:
        return queued_note(topic, topic_states(topology, topic))
    except NsqdHTTPError:  # a node going away is the subscriber's error to report, not the note's
        return f"waiting for new messages on {topic}"


def _note(err: TextIO, line: str) -> None:
    err.write(line + "\n")
    err.flush()


def _print_burst(sub: NsqSubscriber, wanted: int, out: TextIO) -> Iterator[bool]:
    """Print up to ``wanted`` records waiting on ``sub``, yielding for each line whether it was a record.

    An envelope prints as its records; once ``wanted`` records are out the rest
    of that envelope is skipped (the tail consumes a copy, nothing is lost).

    Raises:
        PublishError: nsqd closed the connection (messages() raises it).
    """
    printed = 0
    for message in islice(sub.messages(READ_TIMEOUT), wanted):  # bounded in messages too, so no node starves
        for line, is_record in format_message(message):
            out.write(line + "\n")
            out.flush()
            printed += is_record
            yield is_record
            if printed >= wanted:
                return


def format_message(message: NsqMessage) -> list[tuple[str, bool]]:
    """Return the lines printed for ``message``, each with whether it is a record (else a ``#`` comment)."""
    return format_body(message.body, f"message {message.id.decode('ascii', errors='replace')}")


def format_body(body: bytes, what: str) -> list[tuple[str, bool]]:
    """Return the lines printed for a message ``body``, each with whether it is a record.

    One line per record (an envelope gives several), or one ``# undecodable <what>: <reason>`` comment.
    """
    try:
        decoded = decode(body)
        records = envelope.unpack(decoded, body) if envelope.is_envelope(decoded) else [decoded]
        return [(record_json(record), True) for record in records]
    except DecodeError as e:
        return [(f"# undecodable {what}: {e.reason}", False)]
    except TypeError as e:  # decoded, but e.g. a msgpack map keyed by bytes has no JSON form
        return [(f"# undecodable {what}: cannot print as JSON: {e}", False)]


def record_json(record: dict) -> str:
    """Return ``record`` as compact JSON with its keys in their received order.

    Raises:
        TypeError: a key cannot be a JSON key (bytes, tuples).
    """
    try:
        return orjson.dumps(record, default=_jsonable, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        # orjson stops at 64-bit integers; JSON records may hold bigger ones
        # (codecs decodes those exactly), which the standard library prints.
        return json.dumps(record, default=_jsonable, ensure_ascii=False, separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    return repr(value)
