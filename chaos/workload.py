"""The journaling producer: publishes numbers and journals every id nsqd acknowledged.

Each chunk is journaled as ``{"sent": [[id, number], ...]}`` before its MPUB
and ``{"acked": [ids]}`` after nsqd's OK, one JSON line each, flushed. It
publishes through the framework's own :class:`pipeline.Producer` (the topic's
codec and replication, spread over every nsqd with failover: a chunk a node
that went down did not acknowledge goes to the next node). A publish that
fails anyway (every nsqd restarting, stopped, killed) is retried on a new
producer until it is acknowledged or the producer is stopped; a chunk that
was sent but never acknowledged stays in ``sent`` only, so its records may
arrive (not ``unexpected``) but need not (not ``lost``). A share ``poison`` of
the records carries no valid number and must end on the dead-letter topic,
as must each of the ``crashes`` records, which carry a ``crash`` field that
makes ``chaos.crashing:classify`` kill its worker (journaled as
``{"crash": kind, "number": n}``).
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from pipeline.errors import PipelineError
from pipeline.client.producer import Producer
from pipeline.config import TopicSpec

RETRY_S = 0.2


@dataclass
class Journal:
    """What the producer sent and what nsqd acknowledged, read back from ``journal.jsonl``."""

    sent: dict[str, object] = field(default_factory=dict)   # id -> number (poison: a string)
    acked: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, path: Path) -> Journal:
        journal = cls()
        if not path.exists():
            return journal
        with open(path, "rb") as f:
            for line in f:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line cut short by a crash
                for record_id, number in entry.get("sent", ()):
                    journal.sent[record_id] = number
                journal.acked.update(entry.get("acked", ()))
        return journal


def make_record(record_id: str, number: object) -> dict:
    """The record published for one journaled (id, number) (a crash record's ``number`` is its fields)."""
    if isinstance(number, dict):
        return {"id": record_id, "ts": time.time_ns(), **number}
    return {"id": record_id, "ts": time.time_ns(), "number": number}


class Journaled:
    """A producer that journals each chunk of ``(id, payload)`` pairs as sent, publishes it, then journals it acked.

    Subclasses give ``_chunks()``, ``_publish(batch, stop) -> bool`` (False: stopped before
    nsqd acknowledged) and may give ``_close()``; they set ``journal``, ``rate``, ``acked`` and ``done``.
    """

    journal: Path
    rate: float
    acked: int
    done: threading.Event

    def run(self, stop: threading.Event) -> None:
        """Publish everything (or until ``stop``) at ``rate``, journaling as it goes."""
        began = time.monotonic()
        sent = 0
        try:
            with open(self.journal, "ab") as journal:
                for batch in self._chunks():
                    journal.write(orjson.dumps({"sent": batch}) + b"\n")
                    journal.flush()
                    if not self._publish(batch, stop):
                        return
                    journal.write(orjson.dumps({"acked": [i for i, _ in batch]}) + b"\n")
                    journal.flush()
                    self.acked += len(batch)
                    sent += len(batch)
                    ahead = began + sent / self.rate - time.monotonic()
                    if ahead > 0 and stop.wait(ahead):
                        return
        finally:
            self._close()
            self.done.set()

    def _chunks(self):
        raise NotImplementedError

    def _publish(self, batch: list, stop: threading.Event) -> bool:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class JournalingProducer(Journaled):
    """Publishes ``records`` numbers to ``topic`` (declared by ``spec``; None: plain JSON) on the nsqd nodes
    ``nsqd_tcp`` at ``rate``; run it in a thread with :meth:`run`."""

    def __init__(self, nsqd_tcp: str | list[str], topic: str, journal: Path, *, run_id: str, records: int,
                 rate: float, chunk: int = 50, poison: float = 0.0, seed: int = 0, start: int = 1,
                 spec: TopicSpec | None = None, crashes: Sequence[str] = ()):
        self.nsqd_tcp, self.topic, self.spec, self.journal = nsqd_tcp, topic, spec, journal
        self.run_id, self.records, self.rate, self.chunk = run_id, records, rate, chunk
        self.poison, self.start = poison, start
        self.rng = random.Random(seed)
        # where the crash records go: seeded apart from the poison draws, so those stay as they were
        places = random.Random(f"crashes-{seed}").sample(range(start, start + records), len(crashes))
        self.crashes = dict(zip(places, crashes, strict=True))
        self.acked = 0
        self.errors = 0
        self.poisoned = 0
        self.done = threading.Event()
        self._pub: Producer | None = None

    def _chunks(self):
        for first in range(self.start, self.start + self.records, self.chunk):
            batch = []
            for n in range(first, min(first + self.chunk, self.start + self.records)):
                if n in self.crashes:
                    batch.append((f"{self.run_id}-{n}", {"crash": self.crashes[n], "number": n}))
                elif self.poison and self.rng.random() < self.poison:
                    self.poisoned += 1
                    batch.append((f"{self.run_id}-{n}", f"poison-{n}"))
                else:
                    batch.append((f"{self.run_id}-{n}", n))
            yield batch

    def _publish(self, batch: list, stop: threading.Event) -> bool:
        records = [make_record(i, n) for i, n in batch]
        while not stop.is_set():
            try:
                self._pub = self._pub or Producer.to(self.nsqd_tcp, self.topic, self.spec, chunk=self.chunk)
                self._pub.send(records)
                self._pub.flush()
                return True
            except (PipelineError, OSError):
                self.errors += 1
                self._close()
                stop.wait(RETRY_S)
        return False

    def _close(self) -> None:
        if self._pub is not None:
            self._pub.close()
            self._pub = None
