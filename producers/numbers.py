"""The numbers producer: records ``{"id", "ts", "number"}`` for a range of integers.

Used by ``pipeline produce numbers --start S --count N [--rate R]``, by the
demo and by tests. Records go out in TCP MPUB chunks; each chunk counts as
published only once nsqd answered OK.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable, Iterator

from pipeline.codecs import encoder
from pipeline.nsqclient import NsqPublisher


def number_records(start: int, count: int, run_id: str | None = None) -> Iterator[dict]:
    """Yield one record per integer in ``[start, start + count)``.

    ``id`` is ``<run_id>-<number>``: unique per source record within a run,
    and the same for the record and everything derived from it.
    """
    run = run_id or uuid.uuid4().hex[:8]
    for number in range(start, start + count):
        yield {"id": f"{run}-{number}", "ts": time.time_ns(), "number": number}


def produce_numbers(address: str, topic: str, start: int, count: int, *, rate: float = 0.0,
                    chunk: int = 500, codec: str = "json", run_id: str | None = None,
                    on_progress: Callable[[int], None] | None = None) -> int:
    """Publish ``count`` numbers to ``topic`` on the nsqd at ``address``; return how many nsqd acknowledged.

    Parameters:
        rate: records per second; 0 publishes as fast as nsqd accepts.
        chunk: records per MPUB.
        on_progress: called with the number of records acknowledged so far.

    Raises:
        PublishError: nsqd refused a chunk or could not be reached.
    """
    encode = encoder(codec)
    records = number_records(start, count, run_id)
    started = time.monotonic()
    sent = 0
    with NsqPublisher(address) as pub:
        while sent < count:
            size = min(chunk, count - sent)
            pub.send_mpub(topic, [encode(next(records)) for _ in range(size)])
            sent += size
            if on_progress:
                on_progress(pub.acked)
            if rate > 0:
                _pace(started, sent, rate)
        pub.flush()
        if on_progress:
            on_progress(pub.acked)
        return pub.acked


def _pace(started: float, sent: int, rate: float) -> None:
    # Rate limiting, not synchronisation: hold back until the schedule allows the next chunk.
    ahead = started + sent / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
