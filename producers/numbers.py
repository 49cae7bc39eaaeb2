"""The numbers producer: records ``{"id", "ts", "number"}`` for a range of integers.

Used by ``pipeline produce numbers --start S --count N [--rate R]``, by the
demo and by tests. Records go out through :class:`pipeline.Producer`, in TCP MPUB chunks; each
chunk counts as published only once nsqd answered OK.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable, Iterator, Sequence

from pipeline.client.producer import Producer
from pipeline.config import TopicSpec


def number_records(start: int, count: int, run_id: str | None = None) -> Iterator[dict]:
    """Yield one record per integer in ``[start, start + count)``.

    ``id`` is ``<run_id>-<number>``: unique per source record within a run,
    and the same for the record and everything derived from it.
    """
    run = run_id or uuid.uuid4().hex[:8]
    for number in range(start, start + count):
        yield {"id": f"{run}-{number}", "ts": time.time_ns(), "number": number}


def produce_numbers(address: str | Sequence[str], topic: str, start: int, count: int, *, rate: float = 0.0,
                    chunk: int = 500, codec: str = "json", pack: int = 1, run_id: str | None = None,
                    on_progress: Callable[[int], None] | None = None, security=None) -> int:
    """Publish ``count`` numbers to ``topic`` on the nsqd at ``address``; return how many nsqd acknowledged.

    ``address`` may list several nsqd nodes: chunks then go to them round-robin,
    and a node that fails hands its unacknowledged chunks to the next
    (:class:`~pipeline.client.spread.SpreadPublisher`). It returns only once every
    MPUB was acknowledged (or raises), so the result is ``count``.

    Parameters:
        rate: records per second; 0 publishes as fast as nsqd accepts.
        chunk: messages per MPUB.
        pack: records per message (msgpack envelopes when above 1, see pipeline.records.envelope).
        on_progress: called with the number of records acknowledged so far.
        security: TLS and AUTH for the connection (a pipeline.config.security.ClientSecurity).

    Raises:
        PublishError: nsqd refused a chunk or could not be reached.
    """
    spec = TopicSpec(codec=codec, pack=pack)
    with Producer.to(address, topic, spec, chunk=chunk, security=security) as producer:
        return publish_numbers(producer, start, count, rate=rate, run_id=run_id, on_progress=on_progress)


def publish_numbers(producer: Producer, start: int, count: int, *, rate: float = 0.0, run_id: str | None = None,
                    on_progress: Callable[[int], None] | None = None) -> int:
    """Publish ``count`` numbers from ``start`` through ``producer``; return how many nsqd acknowledged."""
    producer.on_progress = on_progress
    return producer.publish(number_records(start, count, run_id), rate=rate)
