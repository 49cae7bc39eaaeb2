"""dumps_each: one orjson call for a list of records, the same bytes as one call per record."""
from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.records.bulkjson import OPTIONS, dumps_each

# Strings full of what the splitter must not take for structure: commas, quotes, backslashes, brackets.
TEXT = st.text(alphabet=st.sampled_from(list(',"\\{}[]:é€\x00\n a')) | st.characters(), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
                                                                                   allow_infinity=False) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=12)
RECORDS = st.dictionaries(TEXT, VALUES, max_size=6)


def one_by_one(records):
    return [orjson.dumps(r, option=OPTIONS) for r in records]


def outcome(encode, records):
    try:
        return encode(records)
    except TypeError as e:  # e.g. a lone surrogate: neither way encodes it
        return type(e)


@settings(max_examples=100, deadline=None)
@given(st.lists(RECORDS | VALUES, max_size=12))
def test_the_same_bytes_as_one_dumps_per_record(records):
    assert outcome(dumps_each, records) == outcome(one_by_one, records)


def test_numpy_scalars_and_any_iterable():
    records = [{"n": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True)}, {"a": [np.uint8(1)]}]
    assert dumps_each(iter(records)) == one_by_one(records)
    assert dumps_each([]) == [] and dumps_each(()) == []


def test_a_record_that_cannot_be_encoded_raises_type_error_as_orjson_does():
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps_each([{"ok": 1}, {"bad": {1, 2}}])
    with pytest.raises(TypeError, match="64-bit"):
        dumps_each([{"big": 2**64}])


def test_a_record_at_orjson_depth_limit_still_encodes():
    deep: object = 1
    for _ in range(254):  # as deep as orjson.dumps takes alone; inside a list it would be one level too deep
        deep = [deep]
    orjson.dumps(deep)  # the premise
    assert dumps_each([deep, {"a": 1}]) == one_by_one([deep, {"a": 1}])
