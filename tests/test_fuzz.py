"""Property-based fuzzing of every place bad input enters: codecs, envelopes, the topology loader, the stage runtime.

The property is always the same: bad input gives the one documented error
(``DecodeError``, ``TopologyError``) or a dead letter with a reason, never any
other exception, and nothing is lost. Example counts are bounded so the file
stays well under a minute.
"""
from __future__ import annotations

import json
import math
import string

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.records import envelope
from pipeline.records.codecs import decode, encode_json
from pipeline.records.deadletter import DeadLetter, raw_body
from pipeline.errors import DecodeError, TopologyError
from pipeline.config import MAX_MSG_SIZE, load_topology
from test_processing import Msg, processor

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)
MSGPACK_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                   | st.floats() | st.text(max_size=40) | st.binary(max_size=40))
MSGPACK_VALUES = st.recursive(MSGPACK_SCALARS,
                              lambda inner: st.lists(inner, max_size=5)
                              | st.dictionaries(st.text(max_size=10) | INT64 | st.binary(max_size=5), inner,
                                                max_size=5),
                              max_leaves=30)
MARKERS = st.sampled_from([b"", b"{", b"\x80", b"\x81", b"\xde", b"\xdf", b" {", b"[", b"\x81\xa6number"])


def decodes_or_refuses(body: bytes):
    """Decode ``body``; return the record, or None when it raised DecodeError (anything else fails the test)."""
    try:
        record = decode(body)
    except DecodeError as e:
        assert e.reason and e.body == body
        return None
    assert isinstance(record, dict)
    return record


@FUZZ
@given(prefix=MARKERS, rest=st.binary(max_size=300))
def test_random_bytes_decode_to_a_record_or_a_decode_error(prefix, rest):
    decodes_or_refuses(prefix + rest)


@FUZZ
@given(value=JSON_VALUES)
def test_random_json_is_a_record_exactly_when_it_is_an_object(value):
    body = json.dumps(value).encode()
    record = decodes_or_refuses(body)
    assert (record is not None) == isinstance(value, dict)
    if record is not None:
        assert record == json.loads(body)  # exact, big integers included


@FUZZ
@given(value=MSGPACK_VALUES)
def test_random_msgpack_is_a_record_or_a_decode_error(value):
    record = decodes_or_refuses(msgpack.packb(value, use_bin_type=True))
    if record is not None:
        assert isinstance(value, dict) and all(isinstance(k, (str, bytes)) for k in record)


@pytest.mark.parametrize("body", [
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"n": 123456789012345678901, "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # the exact stdlib path
    b"\x81\xa1a" + b"\x91" * 100_000 + b"\x90",
    b"\xdf\xff\xff\xff\xff",  # a map32 claiming 4 billion entries
    b'{"a": ' + b"9" * 5000 + b"}",
    b'{"a": NaN}',
], ids=["deep-json", "deep-json-bigint", "deep-msgpack", "huge-map-header", "5000-digit-int", "nan"])
def test_pathological_bodies_are_decode_errors_with_a_reason(body):
    with pytest.raises(DecodeError) as error:
        decode(body)
    assert error.value.reason.startswith("invalid ") and len(error.value.reason) > len("invalid json: ")


@FUZZ
@example(fields={"n": [], "keys": [None, None], "columns": [None, None]}, version=1)  # crashed: unhashable 'n'
@example(fields={"n": 1, "keys": [[1]], "columns": [[2]]}, version=1)  # crashed: a list as a record key
@given(fields=st.dictionaries(st.sampled_from(["records", "keys", "columns", "n", "x"]), MSGPACK_VALUES, max_size=4),
       version=st.sampled_from([1, 1, 2, "1", None]))
def test_random_envelopes_unpack_to_records_or_a_decode_error(fields, version):
    try:
        records = envelope.unpack({envelope.MARKER: version, **fields})
    except DecodeError as e:
        assert e.reason
        return
    assert all(isinstance(r, dict) for r in records)


VALID = yaml.safe_load("""
nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}], lookupd: [{tcp: 127.0.0.1:4160, http: 127.0.0.1:4161}]}
topics: {numbers: {codec: json}, prime: {pack: 10}, ticks: {partitions: 2, key: symbol}}
stages:
  primes: {handler: 'consumers.primes:classify', input: numbers, channel: primes, outputs: [prime], batch: {size: 8}}
producers: {numbers: {topic: numbers}}
gateway: {http: 127.0.0.1:4180, tokens: {a: {secret: {env: T}, topics: [numbers]}}}
auth: {http: 127.0.0.1:4181}
""")


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


PATHS = list(_paths(VALID))[1:]


def _replace(doc, path, value):
    if len(path) == 1:
        doc[path[0]] = value
    else:
        _replace(doc[path[0]], path[1:], value)


def loads_or_refuses(tmp_path, text: str) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    try:
        load_topology(path)
    except TopologyError as e:
        assert e.reason and str(e).startswith(f"{path}:")


@FUZZ
@given(where=st.sampled_from(PATHS), value=JSON_VALUES)
def test_any_value_anywhere_in_a_topology_loads_or_is_a_topology_error(tmp_path, where, value):
    doc = json.loads(json.dumps(VALID))
    _replace(doc, where, value)
    loads_or_refuses(tmp_path, yaml.safe_dump(doc))


@FUZZ
@given(text=st.text(alphabet=string.printable, max_size=300))
def test_random_text_is_a_topology_error(tmp_path, text):
    loads_or_refuses(tmp_path, text)


@pytest.mark.parametrize("text", ["a: " + "[" * 5000 + "]" * 5000, "a: &x [*x]", "- " * 3000 + "x",
                                  "nsq: !!python/object:os.system {}", "\x00\x01"],
                         ids=["deep-flow", "recursive-alias", "deep-block", "python-tag", "control-chars"])
def test_pathological_topology_files_are_topology_errors(tmp_path, text):
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError):
        load_topology(path)


GOOD = st.builds(lambda n, i: encode_json({"id": f"g-{i}", "number": n}), INT64, st.integers(0, 10**6))
NOT_INT64 = lambda v: type(v) is not int or not -(2**63) <= v < 2**63  # noqa: E731


def _bad_records(values, scalars):
    """Records the primes stage must reject: no 'number', or a 'number' that is not a signed 64-bit integer."""
    no_number = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "number"), values, max_size=4)
    return no_number | st.builds(lambda v: {"id": "b", "number": v}, scalars.filter(NOT_INT64))


BAD = (st.binary(max_size=200)
       | _bad_records(JSON_VALUES, SCALARS).map(lambda r: json.dumps(r).encode())
       | _bad_records(MSGPACK_VALUES, MSGPACK_SCALARS).map(lambda r: msgpack.packb(r, use_bin_type=True))
       | JSON_VALUES.map(lambda v: json.dumps([v]).encode())
       | st.builds(lambda s: b'{"number": "' + s.encode("utf-8", "surrogatepass") + b'"}', st.text(max_size=50)))


@FUZZ
@given(bodies=st.lists(st.tuples(st.booleans(), GOOD, BAD), min_size=1, max_size=40))
def test_stage_runtime_delivers_every_good_record_and_dead_letters_every_bad_one(tmp_path, bodies):
    messages = [Msg(good if is_good else bad, id=b"%016d" % i) for i, (is_good, good, bad) in enumerate(bodies)]
    outcome = processor(tmp_path).process(messages)
    assert outcome.retry == [] and sorted(id(m) for m in outcome.finish) == sorted(id(m) for m in messages)
    out = [decode(b) for bodies_ in outcome.outputs.values() for b in bodies_]
    dead_ids = {d.message.id for d in outcome.dead}
    for (is_good, good, _), message in zip(bodies, messages):
        if is_good:
            assert decode(good)["id"] in {r["id"] for r in out} and message.id not in dead_ids
        else:  # random bytes can make a good record by chance; then it must come out
            assert message.id in dead_ids or _is_good_record(message.body)
    for dead in outcome.dead:
        assert dead.reason
        letter = DeadLetter(dead.reason, "primes", "numbers", "c", 1, "x", dead.body).encode()
        assert len(letter) <= MAX_MSG_SIZE and raw_body(letter) == dead.body


def _is_good_record(body: bytes) -> bool:
    try:
        n = decode(body).get("number")
    except DecodeError:
        return False
    return type(n) is int and -(2**63) <= n < 2**63


@settings(max_examples=10, deadline=None)
@given(size=st.integers(MAX_MSG_SIZE - 2000, MAX_MSG_SIZE), fill=st.sampled_from([b"\x01", b"\xff", b'"', b"x"]))
def test_dead_letter_of_a_body_at_nsqds_limit_still_fits(size, fill):
    body = (fill * size)[:size]
    letter = DeadLetter("invalid json", "primes", "numbers", "c", 1, "x" * 16, body).encode()
    assert len(letter) <= MAX_MSG_SIZE
    record = decode(letter)
    kept = raw_body(letter)
    assert kept == body or (record["body_truncated_from"] == size and body.startswith(kept) and
                            math.isclose(len(kept), size, rel_tol=0.01))


def test_an_integer_just_below_the_signed_64_bit_range_decodes_exactly():
    # hypothesis found it: orjson reads -2**63 - 1 (19 digits) as a float; ns timestamps (19 digits) stay fast
    for value in (-(2**63) - 1, -(10**19) + 1, 2**64, -(2**63)):
        body = json.dumps({"n": value}).encode()
        assert decodes_or_refuses(body) == {"n": value}
