"""Where a topic's undelivered messages are, and the durable ``keep`` channel that keeps them safe from a look.

NSQ keeps what is published to a topic without channels in the topic itself,
until the first channel appears and takes it all; an ephemeral channel (what
``nsq_tail`` and ``pipeline tail`` subscribe through) drops its messages when
its last client goes. So before a read-only command subscribes to a topic that
has no durable channel, :func:`ensure_kept` creates the durable channel
:data:`~pipeline.config.KEEP_CHANNEL` on it: the backlog moves there, and the
ephemeral channel only ever gets copies. ``pipeline up`` does the same for every
topic no stage reads (:meth:`~pipeline.config.topology.Topology.kept_topics`).

Example::

    for where in ensure_kept(topology, "orders.dead", log=print):
        print(where.http, where.topic, where.undelivered)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.client import nsqd_http
from pipeline.config import KEEP_CHANNEL

EPHEMERAL = "#ephemeral"


@dataclass(frozen=True)
class ChannelState:
    """One channel of a topic on one nsqd: messages queued, in flight and deferred."""

    name: str
    depth: int
    in_flight: int
    deferred: int

    @property
    def ephemeral(self) -> bool:
        """Whether nsqd drops the channel, and its messages, once its last client goes."""
        return self.name.endswith(EPHEMERAL)

    @property
    def undelivered(self) -> int:
        """Messages not finished yet: queued, in flight and deferred."""
        return self.depth + self.in_flight + self.deferred


@dataclass(frozen=True)
class TopicState:
    """One NSQ topic on one nsqd, as ``/stats`` shows it (``exists`` False: nsqd has no such topic)."""

    tcp: str
    http: str
    topic: str
    exists: bool = False
    depth: int = 0  # waiting in the topic itself: it has had no channel since they came
    channels: dict[str, ChannelState] = field(default_factory=dict)

    @property
    def durable(self) -> list[ChannelState]:
        """The channels that keep their messages when nobody reads them."""
        return [c for c in self.channels.values() if not c.ephemeral]

    @property
    def undelivered(self) -> int:
        """Messages nsqd holds for this topic: in the topic, plus every durable channel's undelivered."""
        return self.depth + sum(c.undelivered for c in self.durable)


def topic_state(tcp: str, http: str, topic: str) -> TopicState:
    """``topic`` on the nsqd at ``tcp``/``http`` now.

    Raises:
        NsqdHTTPError: nsqd does not answer.
    """
    found = nsqd_http.topic_stats(http, topic)
    if found is None:
        return TopicState(tcp, http, topic)
    channels = {c["channel_name"]: ChannelState(c["channel_name"], int(c["depth"]), int(c["in_flight_count"]),
                                                int(c["deferred_count"])) for c in found.get("channels") or []}
    return TopicState(tcp, http, topic, True, int(found["depth"]), channels)


def topic_states(topology, topic: str) -> list[TopicState]:
    """``topic`` (each of its partitions) on every nsqd of ``topology``, nodes in file order."""
    nodes = list(zip(topology.nsqd_tcp_addresses(), topology.nsqd_http_addresses(), strict=True))
    return [topic_state(tcp, http, physical) for tcp, http in nodes for physical in topology.physical_topics(topic)]


def keepers(topology, physical: str) -> list[str]:
    """The durable channels that should hold ``physical``'s messages; [] when the topology does not publish to it.

    A topic a stage reads: its stages' channels (what ``pipeline up`` creates);
    another declared topic (or partition) or a dead-letter topic: ``keep``.
    """
    readers = [s.channel for s in topology.stages.values() if physical in topology.physical_topics(s.input)]
    if readers:
        return readers
    declared = {t for name in topology.topics for t in topology.physical_topics(name)}
    dead = {topology.dead_letter_topic(s) for s in topology.stages}
    return [KEEP_CHANNEL] if physical in declared or physical in dead else []


def ensure_kept(topology, topic: str, log: Callable[[str], None]) -> list[TopicState]:
    """Give ``topic`` a durable channel wherever it has none; return the topic's states after.

    The channel is ``keep``, or the stages' own channels on a topic stages read
    (the messages are theirs: a ``keep`` there would copy all of them). A
    partition or node without the topic gets a channel only if the topology
    publishes to it, so a mistyped name creates nothing; one with the topic but
    unknown to the topology gets ``keep``. Each channel created is one line to ``log``.

    Raises:
        NsqdHTTPError: an nsqd does not answer.
    """
    states = []
    for state in topic_states(topology, topic):
        if not state.durable:
            for channel in keepers(topology, state.topic) or ([KEEP_CHANNEL] if state.exists else []):
                nsqd_http.create_channel(state.http, state.topic, channel)
                kept = (f"its {state.depth:,} queued message(s) moved there; nothing was removed" if state.depth
                        else "it keeps what is published from now on")
                log(f"created the durable channel {channel!r} on {state.topic} (nsqd {state.http}): {kept}")
            state = topic_state(state.tcp, state.http, state.topic)
        states.append(state)
    return states


def queued_note(topic: str, states: list[TopicState]) -> str:
    """The line a quiet tail prints: where ``topic``'s queued messages are and how to see them."""
    totals: dict[str, int] = {}
    for state in states:
        for durable in state.durable:
            totals[durable.name] = totals.get(durable.name, 0) + durable.depth + durable.deferred
    if not totals:
        return f"waiting for new messages on {topic} (no durable channel keeps its messages)"
    channel = KEEP_CHANNEL if KEEP_CHANNEL in totals else max(totals, key=lambda name: totals[name])
    peek = f"`pipeline peek {topic}`" if channel == KEEP_CHANNEL else f"`pipeline peek {topic} --channel {channel}`"
    return (f"waiting for new messages on {topic} ({totals[channel]:,} already queued in channel {channel}; "
            f"{peek} shows them)")
