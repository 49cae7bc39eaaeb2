"""BatchProcessor's batch decode of plain JSON messages decides exactly what message-by-message decoding does.

One record per JSON message is decoded for the whole batch at once
(``BatchProcessor._plain_records``); any batch it cannot take whole goes the
general way. These tests pin the outcomes of both ways and compare them on
random batches.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.primes import classify
from pipeline.records.codecs import encode_json
from pipeline.records.envelope import MARKER, pack
from pipeline.runtime.processing import BatchProcessor, ProcessingContext
from pipeline.config import load_topology
from test_processing import Msg, out_records, processor


class MessageByMessage(BatchProcessor):
    """The reference: every batch decoded one message at a time (the general path)."""

    def _plain_records(self, messages, most):
        return None


def reference(tmp_path, handler=classify) -> BatchProcessor:
    """A processor like ``processor(tmp_path, handler)`` that decodes message by message."""
    fast = processor(tmp_path, handler)
    return MessageByMessage(ProcessingContext(fast.name, fast.spec, load_topology(tmp_path / "topology.yaml"),
                                              handler, fast.middleware))


def msgs(*bodies: bytes, attempts: int = 1) -> list[Msg]:
    return [Msg(body, attempts=attempts, id=b"%016d" % i) for i, body in enumerate(bodies)]


def record(n) -> bytes:
    return json.dumps({"id": f"r-{n}", "number": n}, separators=(",", ":")).encode()


def test_plain_records_are_classified_and_all_finished(tmp_path):
    messages = msgs(*(record(n) for n in range(1, 101)))
    outcome = processor(tmp_path).process(messages)
    assert [r["number"] for r in out_records(outcome, "prime")] == [n for n in range(2, 101)
                                                                    if all(n % d for d in range(2, n))]
    assert len(outcome.outputs["non_prime"]) == 100 - 25
    assert outcome.finish == messages and outcome.dead == [] and outcome.retry == []


def test_a_rejected_record_is_dead_lettered_with_its_message_body(tmp_path):
    messages = msgs(record(7), record("x"), record(8))
    outcome = processor(tmp_path).process(messages)
    [dead] = outcome.dead
    assert dead.message is messages[1] and dead.body == messages[1].body and dead.index is None
    assert "'number' must be an integer" in dead.reason
    assert outcome.finish == messages


def test_one_malformed_body_is_dead_lettered_alone(tmp_path):
    messages = msgs(record(7), b'{"id": "broken", "number": ', record(8))
    outcome = processor(tmp_path).process(messages)
    [dead] = outcome.dead
    assert dead.message is messages[1] and dead.reason.startswith("invalid json")
    assert [r["number"] for r in out_records(outcome, "prime")] == [7]
    assert [r["number"] for r in out_records(outcome, "non_prime")] == [8]
    assert sorted(m.id for m in outcome.finish) == sorted(m.id for m in messages)


def test_a_number_beyond_64_bits_is_read_exactly_and_rejected_as_out_of_range(tmp_path):
    # orjson would read 2**64 + 1 as a float: the batch must take the exact decoder.
    messages = msgs(record(7), b'{"id": "big", "number": %d}' % (2**64 + 1))
    outcome = processor(tmp_path).process(messages)
    [dead] = outcome.dead
    assert "outside the signed 64-bit integer range, got int 18446744073709551617" in dead.reason


def test_a_json_envelope_is_unpacked_not_taken_for_a_record(tmp_path):
    env = encode_json({MARKER: 1, "records": [{"id": "a", "number": 2}, {"id": "b", "number": 4}]})
    outcome = processor(tmp_path).process(msgs(record(3), env))
    assert sorted(r["id"] for r in out_records(outcome, "prime")) == ["a", "r-3"]
    assert [r["id"] for r in out_records(outcome, "non_prime")] == ["b"]


def test_a_handler_failure_retries_only_the_failing_message(tmp_path):
    def fail_on_7(batch):
        if any(r.get("number") == 7 for r in batch.records):
            raise ValueError("seven")
        return classify(batch)

    messages = msgs(record(5), record(7), record(9))
    outcome = processor(tmp_path, fail_on_7).process(messages)
    assert outcome.retry == [messages[1]] and outcome.dead == []
    assert [r["number"] for r in out_records(outcome, "prime")] == [5]
    assert outcome.finish == [messages[0], messages[2]]


def test_a_message_past_max_tries_runs_alone_and_is_dead_lettered(tmp_path):
    def fail_on_7(batch):
        if any(r.get("number") == 7 for r in batch.records):
            raise ValueError("seven")
        return classify(batch)

    messages = msgs(record(5), record(7))
    messages[1].attempts = 4  # max_tries 3: its last worker died on it
    outcome = processor(tmp_path, fail_on_7).process(messages)
    [dead] = outcome.dead
    assert dead.message is messages[1] and "ValueError: seven" in dead.reason
    assert [r["number"] for r in out_records(outcome, "prime")] == [5]


GOOD = st.builds(lambda n: record(n), st.integers(-(2**70), 2**70))  # 20 digits and more take the exact decoder
BODIES = st.one_of(
    GOOD,
    st.builds(lambda n: b'  {"number": %d}' % n, st.integers(0, 100)),  # leading blanks: still JSON
    st.builds(lambda n: encode_json({"n": n}), st.integers(0, 10)),  # no number field: rejected
    st.builds(lambda v: json.dumps({"number": v}).encode(), st.floats(allow_nan=False) | st.text(max_size=5)),
    st.sampled_from([b"", b"[1, 2]", b"7", b"{", b'{"number": 1}{', b"\xff\xfe", b'{"a": "\xed\xa0\x80"}']),
    st.builds(lambda n: encode_json({MARKER: 1, "records": [{"number": n}]}), st.integers(0, 100)),
    st.builds(lambda n: pack([{"id": "p", "number": n}], 10)[0], st.integers(0, 100)),  # a msgpack envelope
)


def fail_on_13(batch):
    if any(r.get("number") == 13 for r in batch.records):
        raise ValueError("thirteen")
    return classify(batch)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """(batch decode, message-by-message) processors for each handler."""
    made = {}
    for handler in (classify, fail_on_13):
        path = tmp_path_factory.mktemp("plain")
        made[handler] = processor(path, handler), reference(path, handler)
    return made


@settings(max_examples=120, deadline=None)
@given(bodies=st.one_of(st.lists(GOOD, min_size=1, max_size=12), st.lists(BODIES, min_size=1, max_size=12)),
       attempts=st.lists(st.integers(1, 4), min_size=12, max_size=12), failing=st.booleans())
def test_batch_decode_decides_what_message_by_message_decode_does(both_ways, bodies, attempts, failing):
    messages = [Msg(body, attempts=a, id=b"%016d" % i) for i, (body, a) in enumerate(zip(bodies, attempts))]
    batch_way, reference_way = both_ways[fail_on_13 if failing else classify]
    fast = batch_way.process(messages)
    slow = reference_way.process(messages)
    assert fast.outputs == slow.outputs
    assert [(d.message.id, d.reason, d.body, d.index) for d in fast.dead] == \
        [(d.message.id, d.reason, d.body, d.index) for d in slow.dead]
    assert sorted(m.id for m in fast.finish) == sorted(m.id for m in slow.finish)
    assert [m.id for m in fast.retry] == [m.id for m in slow.retry]
