"""The checker's sinks: record every record that arrives on the pipeline's outputs and dead-letter topic.

One thread per topic and nsqd node reads it through its own channel straight
from that nsqd (not through the proxy: the sinks are instruments, not the
system under test; a topic's messages are spread over the nodes), reconnecting
when nsqd restarts. Each arrival is appended to ``arrivals.jsonl`` as
``{"topic", "id", "number", "attempts", "t", "node"}`` before
the message is finished, and kept in memory for the checker. With
``keep_records`` (the ticks pipeline, whose checker compares values) the
whole record is kept and journaled too, under ``"record"``.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from pipeline.records.codecs import decode
from pipeline.errors import PipelineError
from pipeline.client.nsqclient import NsqSubscriber

RECONNECT_S = 0.2


@dataclass(frozen=True, slots=True)  # slots: a soak keeps a million of them
class Arrival:
    """One record seen by a sink."""

    topic: str
    id: str
    number: object
    attempts: int
    t: float
    prime: bool | None = None
    record: dict | None = None
    node: str = ""  # the nsqd (TCP address) it came from
    reason: str | None = None  # a dead letter's


def parse_arrival(topic: str, dead_topic: str | Collection[str], body: bytes, attempts: int, *,
                  keep: bool = False, node: str = "") -> Arrival:
    """Turn a message body into an :class:`Arrival` (a dead letter's id comes from its raw body).

    ``dead_topic``: the dead-letter topic, or several; ``keep``: keep the decoded record in the arrival;
    ``node``: the nsqd it came from.
    """
    record = decode(body)
    reason = None
    if topic == dead_topic or (not isinstance(dead_topic, str) and topic in dead_topic):
        reason = record.get("reason")
        try:
            record = decode(record["body"].encode()) if "body" in record else {}
        except (PipelineError, KeyError, AttributeError):
            record = {}
    return Arrival(topic, str(record.get("id")), record.get("number"), attempts, time.time(), record.get("prime"),
                   record if keep else None, node, reason)


class Sinks:
    """Reader threads over ``topics`` on every nsqd of ``nsqd_tcp``; :meth:`stop` ends them, :attr:`arrivals`
    holds what came."""

    def __init__(self, nsqd_tcp: str | Sequence[str], topics: list[str], channel: str,
                 dead_topic: str | Collection[str], journal: Path, *, keep_records: bool = False):
        self.nodes = [nsqd_tcp] if isinstance(nsqd_tcp, str) else list(nsqd_tcp)
        self.topics, self.channel, self.dead_topic = topics, channel, dead_topic
        self.keep_records = keep_records
        self.arrivals: list[Arrival] = []
        self.last_arrival = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._file = open(journal, "a", buffering=1)
        self._threads = [threading.Thread(target=self._read, args=(t, node), name=f"sink-{t}@{node}", daemon=True)
                         for t in topics for node in self.nodes]

    def start(self) -> Sinks:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._file.close()

    def _read(self, topic: str, node: str) -> None:
        while not self._stop.is_set():
            try:
                with NsqSubscriber(node, topic, self.channel, rdy=500, timeout=2.0) as sub:
                    while not self._stop.is_set():
                        for message in sub.messages(timeout=0.2):
                            self._record(parse_arrival(topic, self.dead_topic, message.body, message.attempts,
                                                       keep=self.keep_records, node=node))
            except (PipelineError, OSError):
                self._stop.wait(RECONNECT_S)  # nsqd restarting or stopped: try again

    def _record(self, arrival: Arrival) -> None:
        with self._lock:
            self.arrivals.append(arrival)
            self.last_arrival = time.monotonic()
            line = {"topic": arrival.topic, "id": arrival.id, "number": arrival.number,
                    "attempts": arrival.attempts, "t": arrival.t, "prime": arrival.prime, "node": arrival.node}
            if arrival.record is not None:
                line["record"] = arrival.record
            if arrival.reason is not None:
                line["reason"] = arrival.reason
            self._file.write(json.dumps(line) + "\n")

    def quiet_for(self) -> float:
        """Seconds since the last arrival."""
        return time.monotonic() - self.last_arrival
