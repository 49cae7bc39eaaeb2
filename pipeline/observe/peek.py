"""Show a topic's queued messages without removing any (``pipeline peek``).

The messages are read from a durable channel, ``keep`` unless told otherwise,
on every nsqd (every partition of a partitioned topic): up to N are held in
flight, printed, and requeued at once (:mod:`pipeline.client.peek`), so the
channel holds what it held before. On a topic without any durable channel,
``keep`` is created first (one line on ``err``): the backlog moves into it and
nothing is lost. Lines are those of ``pipeline tail``: a compact JSON object a
record, envelopes unpacked, oldest message first. Example::

    from pipeline.observe.peek import peek_topic

    peek_topic(load_topology("topology.yaml"), "numbers.dead", count=5, out=sys.stdout, err=sys.stderr)

Each look counts as a delivery in a message's ``attempts``; a stage compares
those with its ``max_tries``, so ``--channel`` on a stage's own channel says so.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from pipeline.client import peek as client_peek
from pipeline.client.nsqclient import NsqMessage
from pipeline.config import KEEP_CHANNEL
from pipeline.config.security import client_security
from pipeline.errors import ChannelNotFound
from pipeline.observe.tail import format_message
from pipeline.ops.keep import ensure_kept, topic_states

Log = Callable[[str], None]


def peek_messages(topology, topic: str, count: int, *, channel: str | None = None,
                  log: Log = lambda line: None) -> list[tuple[str, NsqMessage]]:
    """Up to ``count`` messages queued in ``channel`` of ``topic``, oldest first; none is removed.

    Returns (nsqd TCP address, message) pairs. ``channel`` None reads ``keep``,
    created first where the topic has no durable channel; a channel is never
    created otherwise, so a read never starts a channel that would then keep a
    copy of everything published. Notes (a channel created, a stage's channel
    read) go to ``log``.

    Raises:
        ChannelNotFound: no nsqd has the channel on the topic.
        PublishError: an nsqd refuses the subscription (an auth grant missing ...).
        NsqdHTTPError: an nsqd's HTTP API does not answer.
    """
    name = channel or KEEP_CHANNEL
    states = ensure_kept(topology, topic, log) if name == KEEP_CHANNEL else topic_states(topology, topic)
    found = [s for s in states if name in s.channels]
    if not found:
        raise ChannelNotFound(_missing(topic, name, {c.name for s in states for c in s.durable}))
    readers = {(t, stage.channel) for stage in topology.stages.values()
               for t in topology.physical_topics(stage.input)}
    if any((s.topic, name) in readers for s in found):
        log(f"channel {name} is a stage's: each message shown counts as one delivery attempt toward its max_tries")
    security = client_security(topology, "tail")
    messages = []
    for state in found:
        depth = state.channels[name].depth
        # A channel one connection can hold whole is read whole and requeued in the order it came in, so
        # it keeps its order and the oldest are shown; a deeper one is read from its head, and the
        # messages read go to the back of the queue.
        wanted = depth if depth <= client_peek.MAX_RDY else min(count, depth)
        if wanted:
            messages += [(state.tcp, m) for m in client_peek.peek(state.tcp, state.topic, name, wanted,
                                                                   security=security)]
    return sorted(messages, key=lambda pair: pair[1].timestamp)[:count]


def _missing(topic: str, channel: str, durable: set[str]) -> str:
    if not durable:
        return f"topic {topic} has no channel {channel!r} on any nsqd (nothing is queued for it)"
    return (f"topic {topic} has no channel {channel!r}; its durable channels: {', '.join(sorted(durable))} "
            f"(choose one with --channel)")


def peek_topic(topology, topic: str, *, count: int, out: TextIO, err: TextIO, channel: str | None = None) -> int:
    """Print up to ``count`` of ``topic``'s queued records to ``out`` without removing any; return how many.

    Undecodable messages print as ``#`` comments and are not counted, as in
    ``pipeline tail``; notes (a channel created, nothing queued) go to ``err``.

    Raises:
        ChannelNotFound, PublishError, NsqdHTTPError: as :func:`peek_messages`.
    """
    def note(line: str) -> None:
        err.write(line + "\n")
        err.flush()

    printed = 0
    messages = peek_messages(topology, topic, count, channel=channel, log=note)
    for _, message in messages:
        for line, is_record in format_message(message):
            if printed >= count:
                break
            out.write(line + "\n")
            printed += is_record
    out.flush()
    if not messages:
        note(f"nothing queued on {topic} in channel {channel or KEEP_CHANNEL}")
    return printed
