"""JSON-encode a batch of records in one orjson call and cut it into one body per record.

``orjson.dumps`` writes into a 1 KiB buffer that it then shrinks to the
output's size; a worker keeps its outputs until nsqd acknowledges them, so
each body of one JSON record per message costs a fresh ``malloc`` of that
buffer, and the encoding of a batch cost several times orjson's own work.
:func:`dumps_each` encodes the whole list in one call instead, finds where
each item begins and ends with one compiled pass (orjson writes no
whitespace, so an item ends at the next comma outside strings and nested
values), and slices the items out: the same bytes ``orjson.dumps`` gives for
each record alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import orjson
from numba import njit

OPTIONS = orjson.OPT_SERIALIZE_NUMPY  # as pipeline.codecs.encode_json

_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPEN_OBJECT, _OPEN_ARRAY, _CLOSE_OBJECT, _CLOSE_ARRAY = ord("{"), ord("["), ord("}"), ord("]")


@njit(cache=True)
def _items(buf, out):
    """Write (start, end) of each item of the compact JSON array ``buf`` into ``out``; return the count."""
    n, depth, start = 0, 0, 1
    in_string, escaped = False, False
    for i in range(1, buf.shape[0] - 1):  # inside the outer [ ]
        c = buf[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == _BACKSLASH:
                escaped = True
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c == _OPEN_OBJECT or c == _OPEN_ARRAY:
            depth += 1
        elif c == _CLOSE_OBJECT or c == _CLOSE_ARRAY:
            depth -= 1
        elif c == _COMMA and depth == 0:
            out[n, 0], out[n, 1] = start, i
            n += 1
            start = i + 1
    if buf.shape[0] > 2:  # not the empty array
        out[n, 0], out[n, 1] = start, buf.shape[0] - 1
        n += 1
    return n


def dumps_each(records: Sequence) -> list[bytes]:
    """``[orjson.dumps(r, option=OPTIONS) for r in records]``, in one orjson call.

    Raises:
        TypeError: a record cannot be encoded (as ``orjson.dumps`` raises it).
    """
    if not isinstance(records, list):
        records = list(records)
    if not records:
        return []
    try:
        whole = orjson.dumps(records, option=OPTIONS)
    except TypeError:  # e.g. one record nested to orjson's depth limit, which the list's level passes
        return [orjson.dumps(record, option=OPTIONS) for record in records]
    bounds = np.empty((len(records), 2), dtype=np.int64)
    n = _items(np.frombuffer(whole, dtype=np.uint8), bounds)
    if n != len(records):  # cannot happen with orjson's compact output; never publish a wrong split
        raise RuntimeError(f"split {len(records)} encoded records into {n} items")
    return list(map(whole.__getitem__, map(slice, bounds[:, 0].tolist(), bounds[:, 1].tolist())))


def warm_up() -> None:
    """Compile the splitter, or load it from numba's cache, before the first batch."""
    dumps_each([{"a": "x,\"}"}, [1, {"b": []}]])


warm_up()
