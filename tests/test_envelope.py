"""Batched envelopes: packing, unpacking, and malformed envelopes."""
from __future__ import annotations

import msgpack
import pytest

from pipeline.codecs import decode
from pipeline.envelope import MARKER, is_envelope, pack, records_of, unpack
from pipeline.errors import DecodeError


def test_uniform_records_pack_as_columns_and_round_trip():
    records = [{"id": f"r-{n}", "ts": n, "number": n} for n in range(250)]
    bodies = pack(records, 100)
    assert len(bodies) == 3
    first = decode(bodies[0])
    assert is_envelope(first) and first["keys"] == ["id", "ts", "number"] and first["n"] == 100
    assert list(records_of(decode(b) for b in bodies)) == records


def test_mixed_records_pack_as_a_list_and_round_trip():
    records = [{"a": 1}, {"b": [1, 2]}, {}, {"a": 2, "c": None}]
    [body] = pack(records, 10)
    assert "records" in decode(body)
    assert unpack(decode(body)) == records


def test_empty_records_are_not_lost_in_columns():
    assert unpack(decode(pack([{}, {}], 10)[0])) == [{}, {}]


@pytest.mark.parametrize("env, reason", [
    ({MARKER: 2, "records": []}, "version 2"),
    ({MARKER: 1, "records": [1]}, "list of maps"),
    ({MARKER: 1, "keys": ["a"], "columns": [[1, 2]], "n": 3}, "length 'n'"),
    ({MARKER: 1, "keys": ["a", "b"], "columns": [[1]], "n": 1}, "as many 'columns'"),
    ({MARKER: 1}, "as many 'columns'"),
])
def test_malformed_envelopes_raise_decode_error(env, reason):
    body = msgpack.packb(env)
    with pytest.raises(DecodeError, match=reason) as info:
        unpack(decode(body), body)
    assert info.value.body == body
