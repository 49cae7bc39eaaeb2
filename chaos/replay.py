"""Replay: republish the records nsqd acknowledged that never arrived anywhere downstream.

An nsqd SIGKILL is outside NSQ's guarantee: what it held in memory is gone.
The producer's journal still has every acknowledged id, and the sinks'
``arrivals.jsonl`` every id that came out, so the difference can be published
again; the pipeline is idempotent by ``id``, so a replay never harms.
"""
from __future__ import annotations

from pathlib import Path

import orjson

from pipeline.client.nsqclient import NsqPublisher

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


def replay_missing(folder: Path, nsqd_tcp: str, topic: str, chunk: int = 500) -> int:
    """Publish the missing records of the run in ``folder`` to ``topic``; return how many."""
    missing = missing_records(folder)
    if missing:
        with NsqPublisher(nsqd_tcp) as pub:
            pub.publish(topic, [make_record(i, n) for i, n in missing], chunk)
    return len(missing)
