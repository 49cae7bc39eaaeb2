"""Publish records to any declared topic, as the topology says: codec, ``pack``, partitions and ``seq``.

::

    from pipeline import Producer

    with Producer("topology.yaml", "orders") as producer:
        producer.send({"order": 1, "qty": 3})
        producer.send(more_orders)          # a list or any iterable of records
    # leaving the block returns once nsqd acknowledged every record

:class:`Producer` encodes each record with its topic's codec (or packs
``pack`` records per message), routes it to its partition ``<topic>.<k>``
by the topic's ``key``, and publishes MPUBs of ``chunk`` messages on one
pipelined connection per nsqd, spread over the topology's nsqd nodes with
failover as the workers' publisher does (each partition stays on one node
while it is up). ``send`` may return before nsqd answered; :meth:`flush`
and leaving the ``with`` block return only once nsqd acknowledged every
record sent, and raise :class:`~pipeline.errors.PublishError` otherwise.

On a keyed topic (one with a ``key``) the producer numbers each key's
records itself (the ``seq`` field), continuing from its durable
:class:`~pipeline.client.position.Position`, so a second run, a restarted run
or tomorrow's file are applied by the keyed stage, once and in order. A record
without ``ts`` gets the time it was sent (ns), and one without ``id`` an id
unique to this run.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.client.nsqclient import chunked
from pipeline.client.position import Position, PositionError
from pipeline.client.spread import SpreadPublisher
from pipeline.config import MAX_MSG_SIZE, TopicSpec
from pipeline.errors import PipelineError, PublishError
from pipeline.records import envelope
from pipeline.records.codecs import encoder
from pipeline.records.partition import PartitionKeyError, Router
from pipeline.records.sources import SourceMark

if TYPE_CHECKING:
    from pipeline.config import Topology

log = logging.getLogger(__name__)

#: The longest a paced record waits in the producer's buffer, in ms (see :meth:`Producer.publish`).
LINGER_MS = 5.0
SAVE_INTERVAL = 1.0  # seconds between position saves while records stream (each waits for nsqd's answers)
# nsqd drops a client that sent nothing for two heartbeats (60 s by default); reconnect well before.
_IDLE_RECONNECT = 30.0
_DEFAULT: Any = object()


class Producer:
    """Publishes records to one declared topic of a topology; a context manager.

    Parameters:
        topology: a :class:`~pipeline.config.Topology` or the path of its file.
        topic: a topic declared in it.
        chunk: messages per MPUB (default: the topology's producer entry for the topic, else 500).
        position: the position file (default ``<var_dir>/producers/<topic>.json``), locked while
            the producer is open; None keeps the numbering in memory, starting at 1 in each run
            (tests only: a keyed stage drops a second run's records as redeliveries). On an
            unkeyed topic a position another producer holds is not an error: the run goes on
            without one (it cannot be resumed).
        keep_seq: on a keyed topic, publish the records' own ``seq`` rather than numbering them
            (for a caller that numbers them itself, durably).

    Raises:
        PipelineError: the topic is not declared, or another producer holds its position.
    """

    def __init__(self, topology: Topology | str | os.PathLike[str], topic: str, *, chunk: int | None = None,
                 position: str | os.PathLike[str] | None = _DEFAULT, keep_seq: bool = False):
        from pipeline.config import load_topology
        from pipeline.config.security import client_security

        if isinstance(topology, (str, os.PathLike)):
            topology = load_topology(topology)
        spec = topology.topics.get(topic)
        if spec is None:
            raise PipelineError(f"topic {topic!r} is not declared in {topology.path or 'the topology'} "
                                f"(declared: {', '.join(sorted(topology.topics)) or 'none'})")
        entry = next((name for name, p in topology.producers.items() if p.topic == topic), None)
        if chunk is None:
            chunk = topology.producers[entry].chunk if entry else 500
        if position is _DEFAULT:
            position = topology.var_dir / "producers" / f"{topic}.json"
        self._setup(topology.nsqd_tcp_addresses(), topic, spec, chunk, position, client_security(topology, entry),
                    keep_seq)

    @classmethod
    def to(cls, addresses: str | Sequence[str], topic: str, spec: TopicSpec | None = None, *, chunk: int = 500,
           position: str | os.PathLike[str] | None = None, security: Any = None, keep_seq: bool = False) -> Producer:
        """A producer for ``topic`` on the nsqd nodes at ``addresses``, declared by ``spec`` (default: plain JSON).

        For callers without a topology file; ``security`` is a
        :class:`~pipeline.config.security.ClientSecurity`.
        """
        producer = cls.__new__(cls)
        producer._setup([addresses] if isinstance(addresses, str) else list(addresses), topic, spec or TopicSpec(),
                        chunk, position, security, keep_seq)
        return producer

    def _setup(self, addresses: list[str], topic: str, spec: TopicSpec, chunk: int,
               position: str | os.PathLike[str] | Path | None, security: Any, keep_seq: bool) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, not {chunk!r}")
        self.topic, self.spec, self.chunk, self.addresses = topic, spec, chunk, addresses
        self.router = Router.for_spec(topic, spec)
        self.pack, self.encode = spec.pack, encoder(spec.codec)
        self.key_field = spec.key
        self.numbered = spec.key is not None and not keep_seq  # this producer assigns each key's seq
        self.seq_field = spec.seq
        try:
            self.position = Position.open(position)
        except PositionError as e:
            if self.numbered:
                raise
            # An unkeyed topic numbers nothing: publish anyway, without a resumable mark.
            log.warning("%s; this run of %r cannot be resumed", e, topic)
            self.position = Position(None)
        self.seq: dict[str, int] = dict(self.position.seq)  # numbering of the records sent so far
        # per physical topic: records (packed at send) or, one record per message, their bodies
        self.buffers: dict[str, list[Any]] = {t: [] for t in self.router.topics}
        self.sent = self.acked = 0  # records
        self.on_progress: Callable[[int], None] | None = None  # called with the records acknowledged so far
        #: What :meth:`flush` records as the source's mark (a file reader sets it; see pipeline.records.sources).
        self.source_mark: Callable[[], SourceMark | None] = lambda: None
        self._run = uuid.uuid4().hex[:8]
        # every physical topic of one declared topic has its copies (replication)
        self._pub = SpreadPublisher(addresses, security=security, copies=lambda physical: spec.replication)
        self._last_send = self._last_save = time.monotonic()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        try:
            if kind is None:
                self.flush()
        finally:
            self.close()

    def close(self) -> None:
        """Close the connections and release the position (without waiting for answers)."""
        self._pub.close()
        self.position.close()

    # -- publishing ----------------------------------------------------------

    def send(self, records: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Queue one record or many; full MPUBs go out at once, the rest at :meth:`flush`.

        Raises:
            PartitionKeyError: a record of a keyed topic has no usable key
                (the records before it are queued).
            RecordError: a record cannot be encoded, or is larger than an nsqd message.
            PublishError: nsqd refused a publish or could not be reached.
        """
        if isinstance(records, Mapping):
            records = (records,)
        for record in records:
            self._add(record)
        if time.monotonic() - self._last_save >= SAVE_INTERVAL:
            self.flush()

    def check_key(self, record: Mapping[str, Any]) -> str:
        """The physical topic of ``record``, checking the key a keyed topic needs.

        Raises:
            PartitionKeyError: the topic has a key and ``record``'s is missing, or not a str or int.
        """
        topic = self.router.topic_of(record)  # type: ignore[arg-type]  # read only: any mapping
        if self.key_field is not None:
            key = record.get(self.key_field)
            if type(key) is not str and type(key) is not int:
                reason = f"no usable {self.key_field!r} field (the key of topic {self.topic!r}): got {key!r:.60}"
                raise PartitionKeyError(reason, record, self.key_field, self.topic)
        return topic

    def _add(self, record: Mapping[str, Any]) -> None:
        topic = self.check_key(record)  # a record without its key fails before it is numbered
        out = dict(record)
        name = seq = None
        if self.numbered:
            key = out[self.key_field]  # type: ignore[index]  # numbered: a key field
            name = key if type(key) is str else str(key)
            out[self.seq_field] = seq = self.seq.get(name, 0) + 1
        if "ts" not in out:
            out["ts"] = time.time_ns()
        if "id" not in out:
            out["id"] = f"{self._run}-{self.sent + 1}"
        item: dict | bytes = out
        if self.pack == 1:  # encoded now, so a record that cannot be is refused alone, before it is numbered
            try:
                item = self.encode(out)
            except (TypeError, ValueError, OverflowError) as e:
                raise RecordError(f"cannot be encoded as {self.spec.codec}: {e}", record) from e
            if len(item) > MAX_MSG_SIZE:
                raise RecordError(f"{len(item):,} bytes encoded, more than nsqd takes in a message "
                                  f"({MAX_MSG_SIZE:,})", record)
        if name is not None:
            self.seq[name] = seq  # type: ignore[assignment]  # numbered: set with name
        self.sent += 1
        buffer = self.buffers[topic]
        buffer.append(item)
        if len(buffer) >= self.chunk * self.pack:
            self._send(topic)

    def flush(self) -> int:
        """Send what is queued, wait until nsqd acknowledged every record, save the position; return the count.

        Raises:
            PublishError: nsqd refused a publish or could not be reached; the
                position keeps only what was acknowledged before.
        """
        for topic, buffer in self.buffers.items():
            if buffer:
                self._send(topic)
        self._pub.flush()
        self._count_acks()
        self.position.save(self.seq, self.source_mark())
        self._last_save = time.monotonic()
        return self.acked

    def publish(self, records: Iterable[Mapping[str, Any]], *, rate: float = 0.0, speed: float | None = None,
                linger_ms: float = LINGER_MS, on_bad: Callable[[RecordError], None] | None = None) -> int:
        """:meth:`send` every record, paced; :meth:`flush`; return the records acknowledged.

        Parameters:
            rate: records per second; 0 publishes as fast as nsqd accepts.
            speed: pace by the records' ``ts`` (ns) instead: a factor of the
                original pace (2 = twice as fast); None ignores ``ts``.
            linger_ms: when paced, records due within this many ms are buffered
                rather than slept for, and the buffer is sent before each sleep or
                once its oldest record has waited this long: a record waits at most
                about this long in the producer.
            on_bad: called with the :class:`RecordError` of a record that cannot be published,
                which is then skipped (raise in it to stop); None: the error stops the run.

        Raises:
            ValueError: both ``rate`` and ``speed``, or a bad value of either.
        """
        if rate < 0 or (rate > 0 and speed is not None):
            raise ValueError(f"pace by rate (>= 0) or by speed, not both: rate={rate!r}, speed={speed!r}")
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be above 0, not {speed!r}")
        if not 0 < linger_ms <= 1000:
            raise ValueError(f"linger_ms must be in (0, 1000], got {linger_ms!r}")
        min_sleep, pacer = linger_ms / 1000.0, Pacer(rate, speed)
        paced = rate > 0 or speed is not None
        oldest = None  # when the oldest buffered record was added (paced runs)
        try:
            for record in records:
                wait = pacer.wait(record)
                if wait >= min_sleep:
                    self._drain()  # nothing waits in a buffer while the producer sleeps
                    oldest = None
                    time.sleep(wait)  # pacing, not synchronisation
                elif oldest is not None and time.monotonic() - oldest >= min_sleep:
                    self._drain()  # behind the rate, it never sleeps: still no record waits longer
                    oldest = None
                try:
                    self.send(record)
                except RecordError as e:
                    if on_bad is None:
                        raise
                    on_bad(e)
                    continue
                if paced and oldest is None:
                    oldest = time.monotonic()
        except Exception as e:
            if not isinstance(e, PublishError):
                self.flush()  # a bad record stops the run with everything before it acknowledged
            raise
        return self.flush()

    def _drain(self) -> None:
        for topic, buffer in self.buffers.items():
            if buffer:
                self._send(topic)

    @property
    def copies_missing(self) -> int:
        """Copies of a replicated topic's messages no nsqd could take (fewer nodes up than ``replication``)."""
        return self._pub.under_replicated

    def _send(self, topic: str) -> None:
        records, self.buffers[topic] = self.buffers[topic], []
        if self.pack > 1:
            bodies = envelope.pack(records, self.pack)
            sizes = [min(self.pack, len(records) - i) for i in range(0, len(records), self.pack)]
        else:
            bodies, sizes = records, [1] * len(records)
        self._keep_alive()
        start, partitioned = 0, len(self.router.topics) > 1
        for part in chunked(bodies, self.chunk):
            self._pub.send_mpub(topic, part, records=sum(sizes[start:start + len(part)]),
                                key=topic if partitioned else None)
            start += len(part)
        self._last_send = time.monotonic()
        self._count_acks()

    def _keep_alive(self) -> None:
        # After a long pause nsqd may have dropped the connection: collect the
        # answers already sent (nothing is then in flight) and reconnect.
        if time.monotonic() - self._last_send < _IDLE_RECONNECT:
            return
        self._pub.flush()
        self._count_acks()
        self._pub.close()  # it reconnects on the next send

    def _count_acks(self) -> None:
        before, self.acked = self.acked, self._pub.acked_records
        if self.on_progress and self.acked != before:
            self.on_progress(self.acked)


class RecordError(PipelineError, ValueError):
    """Raised by :meth:`Producer.send` for a record that cannot be published (not encodable, too large).

    ``error.reason`` says why; ``error.record`` is the record. Nothing of it was queued.
    """

    def __init__(self, reason: str, record: Any):
        super().__init__(f"{reason}: {record!r:.200}")
        self.reason, self.record = reason, record


class Pacer:
    """Says how long to wait before a record is due: by rate (records/s) or by its ``ts`` and a speed."""

    def __init__(self, rate: float, speed: float | None):
        self.rate, self.speed = rate, speed
        self.started: float | None = None
        self.first_ts = 0
        self.count = 0

    def wait(self, record: Mapping[str, Any]) -> float:
        if not self.rate and self.speed is None:
            return 0.0
        now = time.monotonic()
        if self.started is None:
            self.started, self.first_ts = now, self._ts(record) if self.speed else 0
        if self.rate:
            due = self.started + self.count / self.rate
            self.count += 1
        else:
            due = self.started + (self._ts(record) - self.first_ts) / 1e9 / self.speed  # type: ignore[operator]
        return due - now

    @staticmethod
    def _ts(record: Mapping[str, Any]) -> int:
        ts = record.get("ts")
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise ValueError(f"pacing by speed needs an integer 'ts' in ns in every record: {record!r:.200}")
        return ts
