"""What a SIGKILLed nsqd keeps, with ``nsq.durability: durable`` and with nsqd's defaults.

docs/RELIABILITY.md states the guarantee; these tests are its proof, on a real
nsqd v1.3.0 started with the flags ``pipeline up`` renders for each profile,
killed with SIGKILL and started again on the same data directory. nsqd keeps a
topic's and each channel's messages in a disk queue (go-diskqueue): a write is
one write(2) into the page cache, which a killed process does not take with it;
the queue's read and write positions reach its ``.meta.dat`` file only when the
queue syncs (every ``--sync-every`` reads and writes, or ``--sync-timeout``).
On start, nsqd reads the queue from the positions of its last sync, and reads
past a stale write position to the end of the file.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.client import nsqd_http
from pipeline.client.inflight import InFlightSubscriber
from pipeline.client.nsqclient import NsqMessage, NsqPublisher
from pipeline.config import NsqdSpec, NsqSpec
from pipeline.ops.processes import NsqProcess

pytestmark = pytest.mark.integration

CHANNEL = "c"
#: Bytes of one message in a disk queue: a 4-byte length, timestamp 8, attempts 2, id 16, then the body.
QUEUE_HEADER = 4 + 8 + 2 + 16
#: Seconds with no message that mean a channel has nothing left to deliver (nsqd sends from disk at once).
QUIET = 1.0
DEADLINE = 20.0
#: A deferred requeue still far off when nsqd is killed, a few seconds later.
DEFER = 60.0
#: Syncs that never come on their own: the queue's positions on disk stay where a clean stop left them.
NO_SYNC = ["--sync-every=100000000", "--sync-timeout=1h"]


def profile_flags(durability: str, args: tuple[str, ...] = ()) -> list[str]:
    """The nsqd flags ``pipeline up`` renders for ``nsq.durability`` (and an nsqd's ``args``)."""
    node = NsqdSpec(name="n0", tcp="127.0.0.1:4150", http="127.0.0.1:4151", args=list(args))
    return NsqSpec(nsqd=[node], durability=durability).nsqd_flags(node)


def body(prefix: str, i: int) -> bytes:
    """Every body of these tests has the same length, so a queue's positions count messages."""
    return b"%s%05d" % (prefix.encode(), i)


@dataclass(frozen=True)
class QueueMeta:
    """A disk queue's ``.meta.dat``: what nsqd last synced of it."""

    depth: int
    read_pos: int
    write_pos: int


def queue_meta(data_dir: Path, topic: str, channel: str | None = None) -> QueueMeta | None:
    """The synced positions of a topic's (or, with ``channel``, a channel's) disk queue; None before its first sync."""
    name = topic if channel is None else f"{topic}:{channel}"
    path = data_dir / f"{name}.diskqueue.meta.dat"
    if not path.exists():
        return None
    depth, read, write = path.read_text().split()
    return QueueMeta(int(depth), int(read.split(",")[1]), int(write.split(",")[1]))


def wait_meta(data_dir: Path, topic: str, channel: str | None, wanted: QueueMeta) -> None:
    """Return once the queue has synced exactly ``wanted`` (the profile's sync-timeout brings it)."""
    deadline = time.monotonic() + DEADLINE
    while (meta := queue_meta(data_dir, topic, channel)) != wanted:
        assert time.monotonic() < deadline, f"{topic}:{channel} synced {meta}, not {wanted}"
        time.sleep(0.02)


def wait_channel(process: NsqProcess, topic: str, *, depth: int, in_flight: int, deferred: int = 0) -> None:
    """Return once the channel holds ``depth`` messages queued, ``in_flight`` in flight and ``deferred`` deferred."""
    deadline, seen = time.monotonic() + DEADLINE, None
    while True:
        for channel in (nsqd_http.topic_stats(process.http, topic) or {}).get("channels") or []:
            if channel["channel_name"] == CHANNEL:
                seen = (channel["depth"], channel["in_flight_count"], channel["deferred_count"])
        if seen == (depth, in_flight, deferred):
            return
        assert time.monotonic() < deadline, f"channel holds (depth, in flight, deferred) {seen}"
        time.sleep(0.02)


def publish(process: NsqProcess, topic: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` and return once nsqd acknowledged every one."""
    with NsqPublisher(process.tcp) as publisher:
        assert publisher.publish(topic, bodies) == len(bodies)


def sigkill(process: NsqProcess) -> None:
    """Kill nsqd at once, as the OOM killer or `kill -9` would: nothing is flushed."""
    os.kill(process.pid, signal.SIGKILL)
    assert process.popen is not None
    process.popen.wait(timeout=10)


def drain(process: NsqProcess, topic: str, expected: set[bytes]) -> list[bytes]:
    """FIN every message the channel delivers until all of ``expected`` came and then none for QUIET seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + DEADLINE
    with InFlightSubscriber(process.tcp, topic, CHANNEL, rdy=1000, msg_timeout=60) as sub:
        while True:
            for message in sub.receive(timeout=QUIET):
                got.append(message.body)
                sub.finish([message])
            if expected <= set(got) or time.monotonic() > deadline:
                return got


@dataclass
class Held:
    """A consumer's K messages, answered four ways before nsqd is killed."""

    finished: list[NsqMessage] = field(default_factory=list)
    requeued: list[NsqMessage] = field(default_factory=list)  # REQ with no delay: back in the queue
    deferred: list[NsqMessage] = field(default_factory=list)  # REQ with a delay: nsqd keeps it in memory
    in_flight: list[NsqMessage] = field(default_factory=list)  # never answered

    def bodies(self, *kinds: str) -> set[bytes]:
        """The bodies of the given kinds of message."""
        return {m.body for kind in kinds for m in getattr(self, kind)}


def hold(process: NsqProcess, topic: str, count: int) -> tuple[InFlightSubscriber, Held]:
    """Take ``count`` messages and answer a quarter each: FIN, REQ now, REQ in DEFER seconds, none."""
    sub = InFlightSubscriber(process.tcp, topic, CHANNEL, rdy=count, msg_timeout=60)
    messages: list[NsqMessage] = []
    deadline = time.monotonic() + DEADLINE
    while len(messages) < count and time.monotonic() < deadline:
        for message in sub.receive(timeout=QUIET):
            messages.append(message)
            if len(messages) == count:
                break
    assert len(messages) == count
    sub.ready(0)  # before any answer, or nsqd would send more (and the requeued ones again)
    quarter = count // 4
    held = Held(messages[:quarter], messages[quarter:2 * quarter], messages[2 * quarter:3 * quarter],
                messages[3 * quarter:])
    sub.finish(held.finished)
    sub.requeue(held.requeued)
    sub.requeue(held.deferred, delay=DEFER)
    return sub, held


FIRST, HELD, LATER = 200, 20, 100


@pytest.mark.timeout(90)
def test_durable_nsqd_keeps_every_acknowledged_message_but_those_in_flight_or_deferred(nsq_factory, topic) -> None:
    # Given: a durable nsqd with FIRST messages on the channel, HELD of them taken by a consumer and answered
    # four ways, and the channel's queue synced since (its read position past all HELD, the sync-timeout
    # brings it); then LATER more acknowledged, on the channel, and not necessarily synced.
    nsqd = nsq_factory.nsqd("durable", extra=profile_flags("durable"))
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    first = [body("a", i) for i in range(FIRST)]
    publish(nsqd, topic, first)
    sub, held = hold(nsqd, topic, HELD)
    size = QUEUE_HEADER + len(first[0])
    requeued = len(held.requeued)
    synced = QueueMeta(depth=FIRST - HELD + requeued, read_pos=HELD * size, write_pos=(FIRST + requeued) * size)
    wait_meta(nsqd.data_dir, topic, CHANNEL, synced)
    later = [body("b", i) for i in range(LATER)]
    publish(nsqd, topic, later)
    wait_channel(nsqd, topic, depth=FIRST - HELD + requeued + LATER, in_flight=len(held.in_flight),
                 deferred=len(held.deferred))

    # When: nsqd is SIGKILLed and started again on the same data directory.
    sigkill(nsqd)
    sub.close()
    nsqd = nsq_factory.restart(nsqd)

    # Then: everything acknowledged comes back but what was in flight or deferred at the kill; nothing is
    # deferred or in flight any more (nsqd never wrote those down).
    stats = next(c for c in nsqd_http.topic_stats(nsqd.http, topic)["channels"] if c["channel_name"] == CHANNEL)
    assert (stats["in_flight_count"], stats["deferred_count"]) == (0, 0)
    taken = held.bodies("finished", "requeued", "deferred", "in_flight")
    queued = (set(first) - taken) | held.bodies("requeued") | set(later)
    got = drain(nsqd, topic, queued)
    assert set(got) == queued, (f"lost {len(queued - set(got))} of the queued; came back: "
                                f"{len(set(got) & held.bodies('in_flight', 'deferred', 'finished'))} held")
    assert not set(got) & held.bodies("in_flight", "deferred")  # lost: the read position had passed them


@pytest.mark.timeout(90)
def test_what_no_sync_reached_survives_a_sigkill_in_flight_and_deferred_too(nsq_factory, topic) -> None:
    # Given: a durable nsqd whose queues never sync on their own (its args replace the profile's sync
    # flags); a clean stop wrote the queues' positions once, with one message on the channel.
    flags = profile_flags("durable", tuple(NO_SYNC))
    assert flags == ["--mem-queue-size=0", *NO_SYNC]
    nsqd = nsq_factory.nsqd("durable", extra=flags)
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    publish(nsqd, topic, [b"z"])
    wait_channel(nsqd, topic, depth=1, in_flight=0)
    nsqd.stop()
    nsqd = nsq_factory.restart(nsqd)
    synced = queue_meta(nsqd.data_dir, topic, CHANNEL)
    assert synced == QueueMeta(1, 0, QUEUE_HEADER + 1)
    # When: FIRST are published, HELD taken and answered four ways, LATER published, with no sync since,
    # and nsqd is SIGKILLed and started again.
    first, later = [body("a", i) for i in range(FIRST)], [body("b", i) for i in range(LATER)]
    publish(nsqd, topic, first)
    sub, held = hold(nsqd, topic, HELD)
    publish(nsqd, topic, later)
    wait_channel(nsqd, topic, depth=1 + FIRST - HELD + len(held.requeued) + LATER, in_flight=len(held.in_flight),
                 deferred=len(held.deferred))
    assert queue_meta(nsqd.data_dir, topic, CHANNEL) == synced  # nothing of it synced
    sigkill(nsqd)
    sub.close()
    nsqd = nsq_factory.restart(nsqd)
    # Then: every message comes back, those in flight and deferred too (and the finished ones again): nsqd
    # reads from the last synced read position to the end of what was written.
    everything = {b"z", *first, *later}
    assert set(drain(nsqd, topic, everything)) == everything


@pytest.mark.timeout(60)
def test_a_queue_killed_before_its_first_sync_loses_what_it_held(nsq_factory, topic) -> None:
    # Given: a durable nsqd whose new channel has never synced (its sync-timeout is an hour, not the
    # profile's), holding FIRST acknowledged messages.
    nsqd = nsq_factory.nsqd("durable", extra=profile_flags("durable", tuple(NO_SYNC)))
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    publish(nsqd, topic, [body("a", i) for i in range(FIRST)])
    wait_channel(nsqd, topic, depth=FIRST, in_flight=0)
    assert queue_meta(nsqd.data_dir, topic, CHANNEL) is None
    # When: nsqd is SIGKILLed and started again.
    sigkill(nsqd)
    nsqd = nsq_factory.restart(nsqd)
    # Then: the queue starts empty: with no positions on disk, nsqd does not read what the file holds.
    assert drain(nsqd, topic, set()) == []


@pytest.mark.timeout(60)
def test_default_nsqd_loses_every_message_it_held_to_a_sigkill(nsq_factory, topic) -> None:
    # Given: an nsqd on nsqd's defaults (nsq.durability: default) holding FIRST + LATER acknowledged
    # messages, HELD of them taken by a consumer.
    assert profile_flags("default") == []
    nsqd = nsq_factory.nsqd("default", extra=profile_flags("default"))
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    publish(nsqd, topic, [body("a", i) for i in range(FIRST)])
    sub, held = hold(nsqd, topic, HELD)
    publish(nsqd, topic, [body("b", i) for i in range(LATER)])
    wait_channel(nsqd, topic, depth=FIRST - HELD + len(held.requeued) + LATER, in_flight=len(held.in_flight),
                 deferred=len(held.deferred))
    # When: nsqd is SIGKILLed and started again.
    sigkill(nsqd)
    sub.close()
    nsqd = nsq_factory.restart(nsqd)
    # Then: nothing comes back: every message was in nsqd's memory queues (10,000 per topic and channel).
    assert drain(nsqd, topic, set()) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durability", ["durable", "default"])
def test_an_ephemeral_channel_of_a_durable_nsqd_gets_only_what_its_reader_waits_for(nsq_factory, topic,
                                                                                    durability) -> None:
    # Given: a reader on an ephemeral channel (what `pipeline tail` and nsq_tail read), ready for all.
    nsqd = nsq_factory.nsqd(durability, extra=profile_flags(durability))
    nsqd_http.create_topic(nsqd.http, topic)
    bodies = [body("e", i) for i in range(2000)]
    with InFlightSubscriber(nsqd.tcp, topic, "tail#ephemeral", rdy=2500, msg_timeout=60) as sub:
        # When: a burst is published.
        publish(nsqd, topic, bodies)
        got = [m.body for m in sub.receive(timeout=QUIET)]
    # Then: with no memory queue, nsqd drops what the reader was not waiting for at that instant
    # (an ephemeral channel has no disk queue); with the default one, the reader gets every message.
    if durability == "durable":
        assert 0 < len(got) < len(bodies)
    else:
        assert sorted(got) == bodies
