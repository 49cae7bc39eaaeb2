"""Batched envelopes: up to N records in one NSQ message.

A topic with ``pack: N`` carries envelopes instead of single records: a
msgpack map marked by the key :data:`MARKER`, columnar (``keys`` plus one
list per key) when the records share their keys, else a plain list of
records. One message per N records divides NSQ's per-message costs
(framing, FIN, in-flight tracking) by N; the price is coarser redelivery:
the envelope is the unit nsqd retries.

The runtime unpacks envelopes transparently, so a stage sees records either
way, and ``pipeline tail`` prints records, not envelopes.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import msgpack

from .errors import DecodeError

MARKER = "__nsq_pipeline_pack__"
VERSION = 1


def _envelope(records: list[dict]) -> dict:
    keys = list(records[0])
    first = records[0].keys()
    if keys and all(r.keys() == first for r in records):
        columns = [[r[k] for r in records] for k in keys]
        return {MARKER: VERSION, "n": len(records), "keys": keys, "columns": columns}
    return {MARKER: VERSION, "records": records}


def pack(records: list[dict], size: int) -> list[bytes]:
    """Encode ``records`` as msgpack envelopes of at most ``size`` records each."""
    packb = msgpack.Packer(use_bin_type=True).pack
    return [packb(_envelope(records[i:i + size])) for i in range(0, len(records), size)]


def is_envelope(record: dict) -> bool:
    """True when a decoded message body is an envelope rather than a record."""
    return MARKER in record


def unpack(envelope: dict, body: bytes = b"") -> list[dict]:
    """Return the records of a decoded envelope.

    Raises:
        DecodeError: the envelope is malformed (unknown version, columns of
            different lengths, neither columns nor records).
    """
    if envelope.get(MARKER) != VERSION:
        raise DecodeError(f"envelope version {envelope.get(MARKER)!r} is not {VERSION}", body)
    if "records" in envelope:
        records = envelope["records"]
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return records
        raise DecodeError("envelope 'records' must be a list of maps", body)
    keys, columns = envelope.get("keys"), envelope.get("columns")
    if not isinstance(keys, list) or not isinstance(columns, list) or len(keys) != len(columns):
        raise DecodeError("envelope needs 'keys' and as many 'columns'", body)
    n = envelope.get("n")
    if not keys or type(n) is not int or any(not isinstance(c, list) or len(c) != n for c in columns):
        raise DecodeError("envelope columns must be lists of length 'n'", body)
    if not all(isinstance(k, str) for k in keys):  # a list as a key would not even make a dict
        raise DecodeError("envelope keys must be strings", body)
    return [dict(zip(keys, row)) for row in zip(*columns)]


def columns_of(envelope: dict) -> tuple[list[str], list[list], int] | None:
    """``(keys, columns, n)`` of a well-formed columnar envelope, else None (records or malformed)."""
    if envelope.get(MARKER) != VERSION:
        return None
    keys, columns, n = envelope.get("keys"), envelope.get("columns"), envelope.get("n")
    if not isinstance(keys, list) or not keys or not isinstance(columns, list) or len(keys) != len(columns):
        return None
    if set(map(type, columns)) != {list} or set(map(len, columns)) != {n}:
        return None
    return keys, columns, n


def pack_columns(keys: list[str], columns: list[list], n: int, size: int) -> list[bytes]:
    """Encode ``n`` rows given as columns into columnar envelopes of at most ``size`` rows each."""
    packb = msgpack.Packer(use_bin_type=True).pack
    return [packb({MARKER: VERSION, "n": min(size, n - i), "keys": keys, "columns": [c[i:i + size] for c in columns]})
            for i in range(0, n, size)]


def records_of(decoded: Iterable[dict]) -> Iterator[dict]:
    """Yield the records of decoded bodies, unpacking envelopes (for tools and tests)."""
    for item in decoded:
        if is_envelope(item):
            yield from unpack(item)
        else:
            yield item
