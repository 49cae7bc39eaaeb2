"""Batched envelopes: packing, unpacking, and malformed envelopes."""
from __future__ import annotations

import msgpack
import pytest

from pipeline.records.codecs import decode
from pipeline.records.envelope import MARKER, is_envelope, pack, records_of, unpack
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
    ({MARKER: 3, "records": []}, "version 3"),
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


def test_float_and_int64_columns_travel_as_bytes_and_come_back_exactly():
    import math

    import numpy as np
    floats = [0.1, -0.0, 1e308, 5e-324, math.inf, -math.inf, 2.0, math.nan] * 16
    ints = [0, -1, 2**63 - 1, -(2**63), 7, 1 << 40, 3, 12] * 16
    records = [{"id": f"r{i}", "f": f, "i": n, "flag": i % 2 == 0} for i, (f, n) in enumerate(zip(floats, ints))]
    [body] = pack(records, 200)
    raw = msgpack.unpackb(body)  # without the hook: what is on the wire
    assert [type(c).__name__ for c in raw["columns"]] == ["list", "ExtType", "ExtType", "list"]
    assert raw[MARKER] == 2 and raw["columns"][1].data == np.array(floats, dtype="<f8").tobytes()
    decoded = decode(body)
    f, i = decoded["columns"][1], decoded["columns"][2]
    assert (f.dtype, i.dtype) == (np.dtype("<f8"), np.dtype("<i8")) and f.flags.writeable  # numba: no new type
    back = unpack(decoded)
    assert [type(r["f"]) for r in back] == [float] * 128 and [type(r["i"]) for r in back] == [int] * 128
    assert [r["i"] for r in back] == ints and [r["flag"] for r in back] == [r["flag"] for r in records]
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip((r["f"] for r in back), floats))
    assert math.copysign(1.0, back[1]["f"]) == -1.0  # -0.0 stays -0.0


@pytest.mark.parametrize("column", [[1, 2.5], [True, False], [2**63, 1], ["a", "b"], [1, None], [0.5]])
def test_columns_that_are_not_all_floats_or_all_int64_or_are_short_stay_lists(column):
    records = [{"v": v} for v in (column * 64 if len(column) > 1 else column * 127)]
    [body] = pack(records, 200)
    assert type(msgpack.unpackb(body)["columns"][0]) is list
    assert [r["v"] for r in unpack(decode(body))] == [r["v"] for r in records]


def test_long_numeric_columns_of_arrays_or_lists_pack_to_the_same_bytes():
    import numpy as np
    from pipeline.records.envelope import columns_of, pack_columns
    ids, values = [f"r{i}" for i in range(300)], [i * 0.25 for i in range(300)]
    from_lists = pack_columns(["id", "v"], [ids, values], 300, 200)
    assert from_lists == pack_columns(["id", "v"], [ids, np.array(values)], 300, 200)
    keys, columns, n = columns_of(decode(from_lists[0]))
    assert n == 200 and type(columns[1]) is np.ndarray and columns[1].tolist() == values[:200]
    assert type(columns_of(decode(from_lists[1]))[1][1]) is list  # the last 100: too short to be typed
    assert pack_columns(["v"], [np.arange(5)], 5, 10) == pack([{"v": i} for i in range(5)], 10)


def test_a_typed_column_of_the_wrong_size_is_a_decode_error():
    from pipeline.records.envelope import EXT_FLOAT64
    body = msgpack.packb({MARKER: 2, "n": 2, "keys": ["v"], "columns": [msgpack.ExtType(EXT_FLOAT64, b"\0" * 12)]})
    with pytest.raises(DecodeError, match="invalid msgpack"):
        decode(body)
    short = msgpack.packb({MARKER: 2, "n": 2, "keys": ["v"], "columns": [msgpack.ExtType(EXT_FLOAT64, b"\0" * 8)]})
    with pytest.raises(DecodeError, match="length 'n'"):
        unpack(decode(short), short)


def test_version_1_envelopes_are_still_read():
    records = [{"id": f"r{i}", "v": i * 0.5} for i in range(5)]
    v1 = msgpack.packb({MARKER: 1, "n": 5, "keys": ["id", "v"], "columns": [[r["id"] for r in records],
                                                                         [r["v"] for r in records]]})
    assert unpack(decode(v1)) == records


def test_columns_of_and_pack_columns_round_trip_and_refuse_what_is_not_columnar():
    from pipeline.records.envelope import columns_of, pack_columns
    records = [{"id": f"r{i}", "v": i} for i in range(25)]
    bodies = pack_columns(["id", "v"], [[r["id"] for r in records], [r["v"] for r in records]], 25, 10)
    assert [len(unpack(decode(b))) for b in bodies] == [10, 10, 5]
    assert bodies == pack(records, 10)  # the same bytes as packing the records
    keys, columns, n = columns_of(decode(bodies[0]))
    assert (keys, n, columns[1]) == (["id", "v"], 10, list(range(10)))  # short: lists
    assert columns_of(decode(pack([{"a": 1}, {"b": 2}], 10)[0])) is None  # a list of records
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


@pytest.mark.parametrize("density", [0.0, 0.1, 0.9])
def test_columns_of_arrays_and_lists_pick_the_same_rows_and_give_plain_records(density):
    import numpy as np
    from pipeline.stage import Columns

    rng = np.random.default_rng(5)
    n = 200
    numbers = np.arange(n, dtype=np.int64)
    columns = Columns({"id": [f"r-{i}" for i in range(n)], "number": numbers, "x": numbers * 0.5}, n)
    mask = rng.random(n) < density
    picked = columns.where(mask).with_column("flag", True)
    expected = [i for i in range(n) if mask[i]]
    assert type(picked["number"]) is np.ndarray and picked["number"].tolist() == expected
    assert picked["id"] == [f"r-{i}" for i in expected] and picked["flag"] == [True] * len(expected)
    records = picked.records()
    assert records == [{"id": f"r-{i}", "number": i, "x": i * 0.5, "flag": True} for i in expected]
    assert all(type(r["number"]) is int and type(r["x"]) is float for r in records)
    rows = columns.take([5, 1, 5])
    assert rows["number"].tolist() == [5, 1, 5] and rows["id"] == ["r-5", "r-1", "r-5"]
    assert len(columns.take([])) == 0 and columns.take([7])["x"].tolist() == [3.5]
