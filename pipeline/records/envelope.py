"""Batched envelopes: up to N records in one NSQ message.

A topic with ``pack: N`` carries envelopes instead of single records: a
msgpack map marked by the key :data:`MARKER`, columnar (``keys`` plus one
column per key) when the records share their keys, else a plain list of
records. One message per N records divides NSQ's per-message costs
(framing, FIN, in-flight tracking) by N; the price is coarser redelivery:
the envelope is the unit nsqd retries.

Version 2 (what :func:`pack` and :func:`pack_columns` write) carries a column
of at least :data:`TYPED_MIN_ROWS` values that are all floats, or all integers
in the signed 64-bit range, as one msgpack extension holding the values as little-endian float64 or int64
bytes (ext type :data:`EXT_FLOAT64` or :data:`EXT_INT64`); every other column
is a msgpack array, as in version 1, which is still read. Decoding
(:func:`unpackb`, and :func:`pipeline.records.codecs.decode`) turns such a column into
a numpy array with no Python object per value, so a numeric stage
gets its numbers as an array and its numeric outputs leave as bytes
(:class:`pipeline.stage.Columns`). Floats and int64 integers survive the trip
exactly.

The runtime unpacks envelopes transparently, so a stage sees records either
way (with plain Python values), and ``pipeline tail`` prints records, not
envelopes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import itemgetter

import msgpack
import numpy as np

from pipeline.errors import DecodeError
from pipeline.stage import plain

MARKER = "__nsq_pipeline_pack__"
VERSION = 2  # what pack() writes
READABLE = (1, 2)  # what unpack() takes
EXT_FLOAT64, EXT_INT64 = 1, 2
#: Shorter columns stay msgpack arrays: for a few dozen values, the conversion to and from bytes costs
#: more than it saves (a ticks envelope holds a few milliseconds of ticks; a numbers envelope, 1,000).
TYPED_MIN_ROWS = 128
_DTYPES = {EXT_FLOAT64: np.dtype("<f8"), EXT_INT64: np.dtype("<i8")}


def ext_hook(code: int, data: bytes) -> np.ndarray | msgpack.ExtType:
    """msgpack's ``ext_hook``: a typed column as a numpy array; other extensions as they are.

    The array is a writable copy: a read-only one would be a type of its own to a numba kernel,
    compiled again (for seconds) on a worker's first batch.

    Raises:
        ValueError: the bytes are not a whole number of 8-byte values.
    """
    dtype = _DTYPES.get(code)
    return msgpack.ExtType(code, data) if dtype is None else np.frombuffer(data, dtype=dtype).copy()


def unpackb(body: bytes):
    """Decode msgpack ``body`` with typed columns as numpy arrays (see :func:`ext_hook`)."""
    return msgpack.unpackb(body, raw=False, ext_hook=ext_hook)


def encode_column(column) -> list | msgpack.ExtType:
    """A column as version 2 carries it: at least :data:`TYPED_MIN_ROWS` floats or int64 integers as one
    extension, anything else as a list.

    ``column`` is a list, or a numpy array (float and integer dtypes become the extension;
    others, such as bool, a list of Python values).
    """
    if len(column) < TYPED_MIN_ROWS:
        return plain(column)
    if isinstance(column, np.ndarray):
        kind = column.dtype.kind
        if kind == "f":
            return msgpack.ExtType(EXT_FLOAT64, column.astype("<f8", copy=False).tobytes())
        if kind in "iu" and (kind == "i" or column.dtype.itemsize < 8 or not column.size or column.max() < 2**63):
            return msgpack.ExtType(EXT_INT64, column.astype("<i8", copy=False).tobytes())
        return column.tolist()
    kinds = set(map(type, column))  # type(), not isinstance(): bool is not an int here
    if kinds == {float}:
        return msgpack.ExtType(EXT_FLOAT64, np.array(column, dtype="<f8").tobytes())
    if kinds == {int}:
        try:
            return msgpack.ExtType(EXT_INT64, np.array(column, dtype="<i8").tobytes())
        except OverflowError:  # beyond int64: msgpack carries the values themselves (up to uint64)
            return column
    return column


def _envelope(records: list[dict]) -> dict:
    keys = list(records[0])
    first = records[0].keys()
    try:  # C-level: no Python code per record
        uniform = bool(keys) and all(map(first.__eq__, map(dict.keys, records)))
    except TypeError:  # a record that is not a dict
        uniform = False
    if uniform:
        columns = [encode_column(list(map(itemgetter(k), records))) for k in keys]
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
    """Return the records of a decoded envelope (typed columns as plain Python floats and ints).

    Raises:
        DecodeError: the envelope is malformed (unknown version, columns of
            different lengths, neither columns nor records).
    """
    if envelope.get(MARKER) not in READABLE:
        raise DecodeError(f"envelope version {envelope.get(MARKER)!r} is not one of {list(READABLE)}", body)
    if "records" in envelope:
        records = envelope["records"]
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return records
        raise DecodeError("envelope 'records' must be a list of maps", body)
    found = _columns(envelope)
    if isinstance(found, str):
        raise DecodeError(found, body)
    keys, columns, _ = found
    # lengths checked by _columns; no strict= on the inner zip: a keyword argument costs zip() a parse per record
    return [dict(zip(keys, row)) for row in zip(*map(plain, columns), strict=False)]  # noqa: B905


def _columns(envelope: dict) -> tuple[list[str], list, int] | str:
    """``(keys, columns, n)`` of a columnar envelope, or why it is malformed."""
    keys, columns, n = envelope.get("keys"), envelope.get("columns"), envelope.get("n")
    if not isinstance(keys, list) or not isinstance(columns, list) or len(keys) != len(columns):
        return "envelope needs 'keys' and as many 'columns'"
    if (not keys or type(n) is not int or not set(map(type, columns)) <= {list, np.ndarray}
            or set(map(len, columns)) != {n}):
        return "envelope columns must be lists of length 'n'"
    if set(map(type, keys)) != {str}:  # a list as a key would not even make a dict
        return "envelope keys must be strings"
    return keys, columns, n


def columns_of(envelope: dict) -> tuple[list[str], list, int] | None:
    """``(keys, columns, n)`` of a well-formed columnar envelope, else None (records or malformed).

    A column is a list, or a numpy array (float64 or int64) for a typed column.
    """
    if envelope.get(MARKER) not in READABLE:
        return None
    found = _columns(envelope)
    return None if isinstance(found, str) else found


def pack_columns(keys: list[str], columns: list, n: int, size: int) -> list[bytes]:
    """Encode ``n`` rows given as columns (lists or numpy arrays) into envelopes of at most ``size`` rows each."""
    packb = msgpack.Packer(use_bin_type=True).pack
    return [packb({MARKER: VERSION, "n": min(size, n - i), "keys": keys,
                   "columns": [encode_column(c[i:i + size]) for c in columns]})
            for i in range(0, n, size)]


def records_of(decoded: Iterable[dict]) -> Iterator[dict]:
    """Yield the records of decoded bodies, unpacking envelopes (for tools and tests)."""
    for item in decoded:
        if is_envelope(item):
            yield from unpack(item)
        else:
            yield item
