"""Record-by-record check of a packed contender's outputs, done after the clock stopped.

With batched envelopes the output topics' message counts no longer add up to
the records, so the drain criterion (every input envelope FINished, nothing
left on the channel) says every envelope was handled, not that every record
came out right. This check does: the output topics got a ``verify`` channel
before the clock started (:meth:`benchmarks.broker.Broker.prepare`), and
after the clock stopped their envelopes are read back and the numbers in
``prime`` must be exactly the primes in 1..N, those in ``non_prime`` exactly
the rest, each once, with the matching ``prime`` flag.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgpack
import numpy as np

from pipeline.records import envelope
from pipeline.stage import plain

from .broker import OUTPUT_TOPICS, VERIFY_CHANNEL, BenchError, Broker

READ_TIMEOUT = 10.0


def verify_outputs(broker: Broker, message_counts: Mapping[str, int], count: int) -> int:
    """Read every output envelope through the verify channels and check them; return the records checked.

    ``message_counts`` holds each output topic's message_count when the clock stopped: the verify
    channel, created before anything was published, got exactly those messages.

    Raises:
        BenchError: a message is missing, or a record is missing, duplicated, misrouted or mislabelled.
    """
    bodies = {topic: broker.read_channel(topic, VERIFY_CHANNEL, message_counts[topic], READ_TIMEOUT)
              for topic in OUTPUT_TOPICS}
    return check_records(bodies, count)


def check_records(bodies: Mapping[str, Sequence[bytes]], count: int) -> int:
    """Check that ``bodies`` of ``prime`` / ``non_prime`` hold each of the numbers 1..``count`` once, rightly
    routed and flagged; return the number of records.

    Raises:
        BenchError: they do not.
    """
    prime = _prime_mask(count)
    expected = {"prime": np.flatnonzero(prime), "non_prime": np.flatnonzero(~prime[1:]) + 1}
    total = 0
    for topic in OUTPUT_TOPICS:
        numbers, flags = [], []
        for body in bodies.get(topic, ()):
            got_numbers, got_flags = _columns(body)
            numbers += got_numbers
            flags += got_flags
        total += len(numbers)
        if any(flag is not (topic == "prime") for flag in flags):
            raise BenchError(f"verify: a record on {topic} has the wrong 'prime' flag")
        got, want = np.sort(np.asarray(numbers, dtype=np.int64)), expected[topic]
        if got.shape != want.shape or not np.array_equal(got, want):
            extra = np.setdiff1d(got, want).size + (got.size - np.unique(got).size)
            missing = np.setdiff1d(want, got).size
            raise BenchError(f"verify: {topic} holds {got.size:,} records, {want.size:,} expected "
                             f"({missing:,} missing, {extra:,} unexpected or repeated)")
    return total


def _columns(body: bytes) -> tuple[list, list]:
    """The ``number`` and ``prime`` values of one envelope, without building a dict per record."""
    try:
        decoded = envelope.unpackb(body)
    except (ValueError, msgpack.UnpackException) as e:
        raise BenchError(f"verify: an output message is not msgpack: {e}") from e
    if not isinstance(decoded, dict) or not envelope.is_envelope(decoded):
        raise BenchError(f"verify: an output message is not an envelope: {body[:60]!r}")
    keys = decoded.get("keys")
    if decoded.get(envelope.MARKER) in envelope.READABLE and isinstance(keys, list) \
            and {"number", "prime"} <= set(keys) and isinstance(decoded.get("columns"), list):
        columns = decoded["columns"]
        numbers, flags = columns[keys.index("number")], columns[keys.index("prime")]
        if len(numbers) == len(flags) == decoded.get("n"):  # typed columns are arrays: plain values here
            return plain(numbers), plain(flags)
    records = envelope.unpack(decoded, body)  # the general (slower) form; raises DecodeError if malformed
    try:
        return [r["number"] for r in records], [r["prime"] for r in records]
    except KeyError as e:
        raise BenchError(f"verify: an output record has no {e}") from e


def _prime_mask(n: int) -> np.ndarray:
    """``mask[i]`` is True when ``i`` (0..n) is prime: a sieve of Eratosthenes."""
    mask = np.ones(n + 1, dtype=bool)
    mask[:2] = False
    for p in range(2, math.isqrt(n) + 1):
        if mask[p]:
            mask[p * p::p] = False
    return mask
