"""The compiled half of :mod:`pipeline.records.bulkjson`: where each item of a compact JSON array begins and ends.

Loaded through :mod:`pipeline.records.jit` (a worker loads it after it is consuming).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPEN_OBJECT, _OPEN_ARRAY, _CLOSE_OBJECT, _CLOSE_ARRAY = ord("{"), ord("["), ord("}"), ord("]")


@njit(cache=True)
def items(buf, out):
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


def warm_up() -> None:
    """Compile the splitter, or load it from numba's cache."""
    items(np.frombuffer(b'[{"a":"x,\\"}"},[1,{"b":[]}]]', dtype=np.uint8), np.empty((2, 2), dtype=np.int64))


warm_up()
