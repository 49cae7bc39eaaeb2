"""The journaling ticks producer: seeded synthetic ticks to the partitions of ``ticks``, every acked id journaled.

The ticks come from :func:`producers.ticks.synthetic_ticks` (a seeded geometric
Brownian motion per symbol) and are published with
:func:`producers.ticks.produce_ticks`, each to the partition of its symbol, in
chunks. Like :class:`chaos.workload.JournalingProducer`, each chunk is
journaled as ``{"sent": [[id, tick], ...]}`` before it is published (over
every nsqd in ``nsqd_tcp``, each partition on one node while it is up) and
``{"acked": [ids]}`` once nsqd acknowledged all of it, so the checker can
rebuild the offline reference from the journal alone. A chunk that fails is
published again whole on a new connection: the keyed stages drop what they
already applied (by ``seq``), and per-symbol order is kept because a chunk is
retried before the next one is sent.
"""
from __future__ import annotations

import threading
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.config import TopicSpec
from producers.ticks import produce_ticks, synthetic_ticks

from .workload import RETRY_S, Journaled


class TicksJournalingProducer(Journaled):
    """Publishes ``records`` ticks over ``symbols`` symbols at ``rate``; run it in a thread with :meth:`run`."""

    def __init__(self, nsqd_tcp: str | list[str], topic: str, spec: TopicSpec, journal: Path, *, run_id: str,
                 records: int, rate: float, symbols: int, chunk: int = 50, seed: int = 0):
        self.nsqd_tcp, self.topic, self.spec, self.journal = nsqd_tcp, topic, spec, journal
        self.run_id, self.records, self.rate, self.symbols = run_id, records, rate, symbols
        # One produce_ticks call (one connection) per chunk: at least 100 ticks, so that a chunk
        # is not a handful of ticks per partition with a connection each.
        self.chunk = max(chunk, 100)
        self.seed = seed
        self.acked = 0
        self.errors = 0
        self.done = threading.Event()

    def _chunks(self):
        batch: list[tuple[str, dict]] = []
        for tick in synthetic_ticks(self.symbols, self.records, seed=self.seed, run_id=self.run_id):
            batch.append((tick["id"], tick))
            if len(batch) >= self.chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def _publish(self, batch: list[tuple[str, dict]], stop: threading.Event) -> bool:
        ticks = [tick for _, tick in batch]
        while not stop.is_set():
            try:
                produce_ticks(self.nsqd_tcp, self.topic, ticks, spec=self.spec, chunk=self.chunk)
                return True
            except (PipelineError, OSError):
                self.errors += 1
                stop.wait(RETRY_S)
        return False
