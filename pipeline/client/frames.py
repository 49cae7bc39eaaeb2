"""NSQ frames in a read buffer, found by one compiled pass instead of a Python loop per frame.

A read from nsqd holds thousands of frames: ``[size: int32][type: int32][data]``,
and a message frame's data is ``[timestamp: int64][attempts: uint16][id: 16
bytes][body]``, all big-endian. :func:`scan` walks them in numba and returns
one row per complete frame, so :class:`~pipeline.client.fastconn.FastConn` cuts
every id and body out of the buffer with C-level slicing and no Python code
per frame. Compiled with ``cache=True`` and run once at import, like the
primes kernel.
"""
from __future__ import annotations

import numpy as np
from numba import njit

#: The columns of a :func:`scan` row.
START, END, KIND, TIMESTAMP, ATTEMPTS = range(5)
#: The ``KIND`` of a frame too short to hold its type, or a message frame too short for its header.
MALFORMED = -1
FRAME_TYPE_MESSAGE = 2
MESSAGE_HEADER = 26  # timestamp, attempts, id
MAX_FRAMES = 4096  # rows per scan call; a longer buffer takes several calls


@njit(cache=True)
def _scan(buf, pos, out):
    """Fill ``out`` with the complete frames from ``buf[pos]`` on.

    Returns (frames found, where the next frame begins, whether the sizes were valid).
    """
    end = buf.shape[0]
    n = 0
    while n < out.shape[0] and end - pos >= 4:
        # big-endian integers, spelled out: one compiled function loads faster from numba's cache than several
        size = (np.int64(buf[pos]) << 24) | (np.int64(buf[pos + 1]) << 16) | (np.int64(buf[pos + 2]) << 8) \
            | np.int64(buf[pos + 3])
        if size >= 2**31:  # an int32 on the wire, so negative: no frame has that size
            return n, pos, False
        if end - pos - 4 < size:
            break
        start = pos + 4
        pos = start + size
        kind = MALFORMED
        if size >= 4:
            kind = (np.int64(buf[start]) << 24) | (np.int64(buf[start + 1]) << 16) \
                | (np.int64(buf[start + 2]) << 8) | np.int64(buf[start + 3])
        if kind == FRAME_TYPE_MESSAGE:
            if size < 4 + MESSAGE_HEADER:
                kind = MALFORMED
            else:
                timestamp = np.int64(0)
                for k in range(8):
                    timestamp = (timestamp << 8) | np.int64(buf[start + 4 + k])
                out[n, TIMESTAMP] = timestamp
                out[n, ATTEMPTS] = (np.int64(buf[start + 12]) << 8) | np.int64(buf[start + 13])
        out[n, START] = start
        out[n, END] = pos
        out[n, KIND] = kind
        n += 1
    return n, pos, True


def scan(data: bytes, pos: int = 0, max_frames: int = MAX_FRAMES) -> tuple[np.ndarray, int, bool]:
    """Find the complete frames in ``data[pos:]`` (at most ``max_frames``).

    Returns:
        One int64 row per frame (columns :data:`START` .. :data:`ATTEMPTS`:
        where the frame's type begins, where the frame ends, its type or
        :data:`MALFORMED`, and for a message its timestamp and attempts), and
        the offset of the first byte not consumed (the start of an incomplete
        frame, or ``len(data)``), and False when the scan stopped there at a
        negative frame size (the stream is corrupt), else True.
    """
    out = np.empty((max_frames, 5), dtype=np.int64)
    n, pos, valid = _scan(np.frombuffer(data, dtype=np.uint8), pos, out)
    return out[:n], pos, valid


def not_messages(rows: np.ndarray) -> list[int]:
    """The indices of the rows of :func:`scan` that are not (well-formed) message frames."""
    return np.flatnonzero(rows[:, KIND] != FRAME_TYPE_MESSAGE).tolist()


def warm_up() -> None:
    """Compile the scanner, or load it from numba's cache, before the first read."""
    scan(b"\x00\x00\x00\x06\x00\x00\x00\x00OK", 0)


warm_up()
