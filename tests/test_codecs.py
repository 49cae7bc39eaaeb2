"""Codecs: detection from the bytes, exact integers, clear errors."""
from __future__ import annotations

import msgpack
import pytest

from pipeline.records.codecs import decode, detect, encode
from pipeline.records.deadletter import DeadLetter, raw_body
from pipeline.errors import DecodeError


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_round_trip_detects_codec_from_bytes(codec):
    record = {"id": "a-1", "ts": 1, "number": -(2**63), "nested": {"x": [1, 2.5, None]}}
    body = encode(record, codec)
    assert detect(body) == codec
    assert decode(body) == record


def test_json_with_leading_whitespace_as_curl_posts_it():
    assert decode(b'  \n{"number": 7}') == {"number": 7}


def test_integers_beyond_64_bits_stay_exact_integers():
    # orjson would turn this into a float; the record must keep the integer so
    # validation can say it is out of range rather than "not an integer".
    assert decode(b'{"number": 1180591620717411303424}') == {"number": 2**70}


@pytest.mark.parametrize("body, reason", [
    (b"", "empty body"),
    (b"hello", "not a JSON object or msgpack map"),
    (b"[1, 2]", "not a JSON object or msgpack map"),
    (b"{not json", "invalid json"),
    (b'{"a": NaN}', "invalid json"),
    (msgpack.packb({"a": 1}) + b"\x01", "invalid msgpack"),
    (msgpack.packb({1: 2}), "invalid msgpack"),
    (b"\x81", "invalid msgpack"),
])
def test_bad_bodies_raise_decode_error_with_reason_and_body(body, reason):
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert reason in info.value.reason
    assert info.value.body == body


@pytest.mark.parametrize("body", [b'{"number": "abc"}', b"\xff\xfe binary \x00"])
def test_dead_letter_keeps_the_raw_body(body):
    letter = DeadLetter(reason="r", stage="s", topic="t", channel="c", attempts=3, message_id="m", body=body)
    record = decode(letter.encode())
    assert record["reason"] == "r" and record["attempts"] == 3 and record["stage"] == "s"
    assert raw_body(letter.encode()) == body
