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


def test_columns_of_and_pack_columns_round_trip_and_refuse_what_is_not_columnar():
    from pipeline.envelope import columns_of, pack_columns
    records = [{"id": f"r{i}", "v": i} for i in range(25)]
    bodies = pack_columns(["id", "v"], [[r["id"] for r in records], [r["v"] for r in records]], 25, 10)
    assert [len(unpack(msgpack.unpackb(b))) for b in bodies] == [10, 10, 5]
    assert bodies == pack(records, 10)  # the same bytes as packing the records
    keys, columns, n = columns_of(msgpack.unpackb(bodies[0]))
    assert (keys, n, columns[1]) == (["id", "v"], 10, list(range(10)))
    assert columns_of(msgpack.unpackb(pack([{"a": 1}, {"b": 2}], 10)[0])) is None  # a list of records
    assert columns_of({"__nsq_pipeline_pack__": 1, "n": 2, "keys": ["a"], "columns": [[1]]}) is None


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_columns_where_keeps_the_masked_rows_in_order_whether_few_or_many(density):
    import numpy as np
    from pipeline.stage import Columns

    rng = np.random.default_rng(3)
    n = 1000
    columns = Columns({"id": [f"r-{i}" for i in range(n)], "number": list(range(n))}, n)
    mask = rng.random(n) < density
    picked = columns.where(mask)
    expected = [i for i in range(n) if mask[i]]
    assert len(picked) == len(expected)
    assert picked["number"] == expected and picked["id"] == [f"r-{i}" for i in expected]
