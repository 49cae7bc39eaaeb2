"""Replay: republish the records nsqd acknowledged that never arrived anywhere downstream.

An nsqd SIGKILL is outside NSQ's guarantee: what it held in memory is gone.
The producer's journal still has every acknowledged id, and the sinks'
``arrivals.jsonl`` every id that came out, so the difference can be published
again; the pipeline is idempotent by ``id``, so a replay never harms.
"""
from __future__ import annotations

from pathlib import Path

import orjson

from pipeline.client.producer import Producer
from pipeline.config import TopicSpec

from .workload import Journal, make_record


def arrived_ids(path: Path) -> set[str]:
    """Every id in an ``arrivals.jsonl`` (outputs and dead letters)."""
    seen: set[str] = set()
    if path.exists():
        with open(path, "rb") as f:
            for line in f:
                try:
                    seen.add(orjson.loads(line)["id"])
                except (orjson.JSONDecodeError, KeyError):
                    continue
    return seen


def missing_records(folder: Path) -> list[tuple[str, object]]:
    """(id, number) of every acknowledged record of the run in ``folder`` that never arrived."""
    journal = Journal.read(folder / "journal.jsonl")
    seen = arrived_ids(folder / "arrivals.jsonl")
    return sorted(((i, journal.sent[i]) for i in journal.acked - seen if i in journal.sent), key=lambda r: r[0])


def replay_missing(folder: Path, nsqd_tcp: str | list[str], topic: str, chunk: int = 500,
                   spec: TopicSpec | None = None) -> int:
    """Publish the missing records of the run in ``folder`` to ``topic`` on the nsqd ``nsqd_tcp`` (one address or
    several, spread over them); return how many.

    ``spec``: the topic's declaration in the run's topology (its codec and replication); None: plain JSON.
    """
    missing = missing_records(folder)
    if missing:
        with Producer.to(nsqd_tcp, topic, spec, chunk=chunk) as producer:
            producer.send(make_record(i, n) for i, n in missing)
    return len(missing)
