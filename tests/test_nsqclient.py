"""MPUB framing and chunking of the blocking publisher."""
from __future__ import annotations

import struct

from pipeline.client.nsqclient import chunked, encode_mpub


def test_mpub_frame_layout():
    frame = encode_mpub("t", [b"ab", b"c"])
    header, rest = frame.split(b"\n", 1)
    assert header == b"MPUB t"
    size, count = struct.unpack(">II", rest[:8])
    assert size == len(rest) - 4 and count == 2
    assert rest[8:] == struct.pack(">I", 2) + b"ab" + struct.pack(">I", 1) + b"c"


def test_chunks_respect_count_and_bytes_and_keep_everything():
    bodies = [bytes(10)] * 25
    parts = list(chunked(bodies, max_count=10))
    assert [len(p) for p in parts] == [10, 10, 5]
    parts = list(chunked(bodies, max_count=100, max_bytes=14 * 4))
    assert [len(p) for p in parts] == [4] * 6 + [1]
    assert sum(len(p) for p in parts) == 25
    assert list(chunked(bodies, max_count=25, max_bytes=14 * 25)) == [bodies]  # exactly at both limits: one
    assert list(chunked(bodies, max_count=25, max_bytes=14 * 25 - 1)) != [bodies]
    assert list(chunked([], max_count=10)) == []


def test_a_body_larger_than_the_byte_limit_still_goes_out_alone():
    assert list(chunked([b"x" * 100, b"y"], max_count=10, max_bytes=50)) == [[b"x" * 100], [b"y"]]
