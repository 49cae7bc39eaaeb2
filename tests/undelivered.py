"""What nsqd still holds for a topic, for tests that a command removed nothing (issue 19).

``undelivered`` is the figure the acceptance compares before and after a
command: the topic's own depth (messages waiting for a first channel) plus, for
every durable channel, its depth, in flight and deferred. Ephemeral channels are
left out: they are copies, gone with their reader.
"""
from __future__ import annotations

import time

from nsqhttp import topic_stats
from pipeline.client.nsqclient import NsqSubscriber


def undelivered(http: str, topic: str) -> int:
    """The topic's depth plus each durable channel's depth, in flight and deferred, on the nsqd at ``http``."""
    found = topic_stats(http, topic)
    if found is None:
        return 0
    return int(found["depth"]) + sum(int(c["depth"]) + int(c["in_flight_count"]) + int(c["deferred_count"])
                                     for c in found.get("channels") or []
                                     if not c["channel_name"].endswith("#ephemeral"))


def channels(http: str, topic: str) -> dict[str, int]:
    """Each channel of ``topic`` and its depth."""
    found = topic_stats(http, topic) or {}
    return {c["channel_name"]: int(c["depth"]) for c in found.get("channels") or []}


def read_back(tcp: str, topic: str, channel: str, expected: int, timeout: float = 30.0) -> list[bytes]:
    """Consume (FIN) ``expected`` messages of ``topic/channel``, then half a second more for any extra; return bodies.

    Raises:
        AssertionError: fewer than ``expected`` came within ``timeout`` seconds.
    """
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    with NsqSubscriber(tcp, topic, channel, rdy=500) as sub:
        while len(bodies) < expected:
            assert time.monotonic() < deadline, f"{len(bodies)} of {expected} messages came back on {topic}/{channel}"
            bodies += [m.body for m in sub.messages(timeout=0.1)]
        bodies += [m.body for m in sub.messages(timeout=0.5)]  # anything beyond: a duplicate would show here
    return bodies
