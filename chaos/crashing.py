"""The primes stage with records that kill their worker: the poison that ``max_tries`` cannot count.

A record with ``"crash": "exit"`` makes the handler call ``os._exit(1)``; one
with ``"crash": "segv"`` reads address 0, a segfault. Every other record is
classified as :func:`consumers.primes.classify` does. The chaos scenario
``15_poison_crash`` and the runtime's crash quarantine tests run it; the
runtime must dead-letter both records after ``crash_tries`` deaths and deliver
the rest.
"""
from __future__ import annotations

import ctypes
import os

from consumers.primes import classify as classify_primes
from pipeline.stage import Batch

CRASHES = ("exit", "segv")


def classify(batch: Batch) -> dict:
    """Classify like primes, but die on a record marked ``crash`` (see the module docstring)."""
    for record in batch.records:
        crash = record.get("crash") if isinstance(record, dict) else None
        if crash == "exit":
            os._exit(1)
        if crash == "segv":
            ctypes.string_at(0)
    return classify_primes(batch)
