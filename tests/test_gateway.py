"""``pipeline gateway`` against a real nsqd: every answer it promises, and what lands on the topic.

The gateway runs as a subprocess of the test (``pipeline gateway -t``) on a free
port; what it published is read back from nsqd with a subscriber, and what it
refused is checked to have published nothing (nsqd's message count).
"""
from __future__ import annotations

import http.client
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nsqhttp import get_text, wait_until
from pipeline import nsqd_http
from pipeline.codecs import decode
from pipeline.credentials import SecretError, read_secret_file
from pipeline.gateway import TokenBucket, schema_violation, split_binary
from pipeline.nsqclient import MAX_BODY_SIZE, MAX_MSG_SIZE, NsqSubscriber
from pipeline.processes import NsqProcess, free_port, start_process
from pipeline.topology import GatewaySpec

ROOT = Path(__file__).resolve().parent.parent
WRITER, SLOW = "w-" + "a" * 30, "s-" + "b" * 30
MAX_MSG, MAX_BODY = 2000, 6000


@dataclass
class Gw:
    """A running gateway, its nsqd and its topics."""

    proc: NsqProcess
    nsqd: NsqProcess
    topic: str      # schema: {number: integer}
    free: str       # no schema
    other: str      # no token may publish here

    def post(self, path: str, body: bytes, token: str | None = WRITER, headers: dict | None = None):
        """POST and return (status, parsed JSON or text, headers)."""
        host, port = self.proc.http.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            conn.request("POST", path, body=body, headers=sent)
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        data = json.loads(text) if text.startswith("{") else text
        return resp.status, data, resp.headers

    def count(self, topic: str) -> int:
        return nsqd_http.topic_message_count(self.nsqd.http, topic)

    def read(self, topic: str, n: int) -> list[bytes]:
        got: list[bytes] = []
        with NsqSubscriber(self.nsqd.tcp, topic, "check") as sub:
            wait_until(lambda: got.extend(m.body for m in sub.messages(timeout=0.1)) or len(got) >= n, 10)
        return got


def write_topology(tmp_path: Path, nsqd, topic: str) -> Path:
    secret_file = tmp_path / "slow.token"
    secret_file.write_text(SLOW + "\n")
    secret_file.chmod(0o600)
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
        "topics": {topic: {"schema": {"number": "integer"}}, f"{topic}_free": {}, f"{topic}_other": {}},
        "gateway": {"http": f"127.0.0.1:{free_port()}", "max_msg_size": MAX_MSG, "max_body_size": MAX_BODY,
                    "publish_timeout": 3,
                    "tokens": {"writer": {"secret": {"env": "GW_TEST_WRITER"}, "topics": [topic, f"{topic}_free"]},
                               "slow": {"secret": {"file": "slow.token"}, "topics": [f"{topic}_free"],
                                        "rate": 0.01, "burst": 2}}},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def gw(nsqd, tmp_path, topic):
    path = write_topology(tmp_path, nsqd, topic)
    address = yaml.safe_load(path.read_text())["gateway"]["http"]
    os.environ["GW_TEST_WRITER"] = WRITER
    try:
        proc = start_process("gateway", [sys.executable, "-m", "pipeline.cli", "gateway", "-t", str(path)],
                             http=address, log_path=tmp_path / "gateway.log", ping_timeout=20)
    finally:
        del os.environ["GW_TEST_WRITER"]
    for t in (topic, f"{topic}_free", f"{topic}_other"):
        nsqd_http.create_channel(nsqd.http, t, "check")
    yield Gw(proc, nsqd, topic, f"{topic}_free", f"{topic}_other")
    proc.stop()
    assert not proc.alive()


@pytest.mark.integration
def test_authorised_pub_and_mpub_land_on_the_topic_in_order(gw):
    assert gw.post(f"/pub?topic={gw.topic}", b'{"number": 1}')[:2] == (200, "OK")
    assert gw.post(f"/mpub?topic={gw.topic}", b'{"number": 2}\n{"number": 3}\n\n')[:2] == (200, "OK")
    binary = struct.pack(">I", 2) + b"".join(struct.pack(">I", len(m)) + m for m in (b'{"number": 4}', b"\x81\xa6number\x05"))
    assert gw.post(f"/mpub?topic={gw.topic}&binary=true", binary)[:2] == (200, "OK")
    assert [decode(b)["number"] for b in gw.read(gw.topic, 5)] == [1, 2, 3, 4, 5]
    # a topic without schema takes any bytes, as nsqd does
    assert gw.post(f"/pub?topic={gw.free}", b"not json")[:2] == (200, "OK")
    assert gw.read(gw.free, 1) == [b"not json"]


@pytest.mark.integration
def test_missing_wrong_or_unauthorised_token_is_refused_and_publishes_nothing(gw):
    status, body, headers = gw.post(f"/pub?topic={gw.topic}", b'{"number": 1}', token=None)
    assert (status, body["error"]) == (401, "UNAUTHORIZED") and headers["WWW-Authenticate"].startswith("Bearer")
    assert gw.post(f"/pub?topic={gw.topic}", b'{"number": 1}', token="w-nope")[:2] == \
        (401, {"status": 401, "error": "UNAUTHORIZED", "message": "unknown token"})
    status, body, _ = gw.post(f"/pub?topic={gw.other}", b'{"number": 1}')
    assert (status, body["error"]) == (403, "FORBIDDEN") and gw.other in body["message"]
    status, body, _ = gw.post(f"/pub?topic={gw.topic}", b'{"number": 1}', token=SLOW)  # slow: only the free topic
    assert status == 403
    assert gw.count(gw.topic) == gw.count(gw.other) == 0


@pytest.mark.integration
def test_schema_violation_is_400_naming_the_field_and_nothing_of_the_mpub_lands(gw):
    status, body, _ = gw.post(f"/pub?topic={gw.topic}", b'{"number": "7"}')
    assert (status, body["error"], body["message"]) == (400, "SCHEMA", "field 'number' must be an integer, got str")
    status, body, _ = gw.post(f"/mpub?topic={gw.topic}", b'{"number": 1}\n{"numbr": 2}\n{"number": 3}')
    assert (status, body["message"]) == (400, "message 1: field 'number' is required")
    status, body, _ = gw.post(f"/pub?topic={gw.topic}", b"[1, 2]")
    assert status == 400 and "not a JSON object or msgpack map" in body["message"]
    assert gw.count(gw.topic) == 0


@pytest.mark.integration
def test_oversize_message_or_body_is_413(gw):
    status, body, _ = gw.post(f"/pub?topic={gw.free}", b"x" * (MAX_MSG + 1))
    assert (status, body["error"]) == (413, "MSG_TOO_BIG")
    status, body, _ = gw.post(f"/mpub?topic={gw.free}", b"x\n" + b"y" * (MAX_MSG + 1))
    assert (status, body["error"]) == (413, "MSG_TOO_BIG")
    status, body, _ = gw.post(f"/mpub?topic={gw.free}", (b"z" * 999 + b"\n") * 7)  # 7,000 > 6,000 bytes
    assert (status, body["error"]) == (413, "BODY_TOO_BIG")
    # many tiny lines: the body fits, the MPUB frame (4 bytes per message more) would not
    status, body, _ = gw.post(f"/mpub?topic={gw.free}", b"a\n" * 1400)
    assert (status, body["error"]) == (413, "BODY_TOO_BIG")
    assert gw.post(f"/pub?topic={gw.free}", b"x" * MAX_MSG)[:2] == (200, "OK")  # exactly the limit is fine
    assert gw.count(gw.free) == 1


@pytest.mark.integration
def test_over_the_rate_is_429_with_retry_after(gw):
    assert gw.post(f"/pub?topic={gw.free}", b"1", token=SLOW)[0] == 200
    assert gw.post(f"/pub?topic={gw.free}", b"2", token=SLOW)[0] == 200  # burst 2
    status, body, headers = gw.post(f"/pub?topic={gw.free}", b"3", token=SLOW)
    assert (status, body["error"]) == (429, "RATE_LIMITED") and int(headers["Retry-After"]) > 0
    assert gw.post(f"/pub?topic={gw.free}", b"4")[0] == 200  # another token is not limited
    status, body, _ = gw.post(f"/mpub?topic={gw.free}", b"a\nb\nc", token=SLOW)  # over the burst: never fits
    assert (status, body["message"]) == (429, "3 messages are more than token 'slow' may send at once (2); split the /mpub")
    assert gw.count(gw.free) == 3


@pytest.mark.integration
def test_nsqd_down_is_503_and_nothing_is_published(gw):
    gw.nsqd.stop()
    status, body = wait_until(lambda: (r := gw.post(f"/mpub?topic={gw.free}", b"a\nb"))[0] == 503 and r[:2], 10)
    assert status == 503 and body["error"] == "NSQD_UNAVAILABLE"
    assert get_text(gw.proc.http, "/ping")[0] == 503


def test_bad_binary_bodies_are_400():
    with pytest.raises(Exception, match="message count"):
        split_binary(b"\x00", 100)
    with pytest.raises(Exception, match="ends before message 1"):
        split_binary(struct.pack(">II", 2, 1) + b"a", 100)
    with pytest.raises(Exception, match="after the last"):
        split_binary(struct.pack(">II", 1, 1) + b"ab", 100)


def test_schema_types_do_not_take_booleans_for_numbers():
    schema = {"n": "number", "i": "integer", "b": "boolean", "s": "string", "o": "object", "a": "array"}
    good = {"n": 1.5, "i": 3, "b": False, "s": "x", "o": {}, "a": []}
    assert schema_violation(good, schema) is None
    assert schema_violation({**good, "i": True}, schema) == "field 'i' must be an integer, got bool"
    assert schema_violation({**good, "n": 2}, schema) is None
    assert schema_violation({**good, "b": 0}, schema) == "field 'b' must be a boolean, got int"


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=100.0, burst=10)
    assert bucket.take(10) == 0
    wait = bucket.take(5)
    assert 0.04 <= wait <= 0.05
    bucket.stamp -= 0.05  # as if 50 ms passed: 5 more
    assert bucket.take(5) == 0
    assert TokenBucket(rate=0, burst=0).take(10**9) == 0


def test_default_limits_are_nsqds():
    fields = GatewaySpec.model_fields
    assert (fields["max_msg_size"].default, fields["max_body_size"].default) == (MAX_MSG_SIZE, MAX_BODY_SIZE)


def test_secret_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    with pytest.raises(SecretError, match=r"has mode 0644; it must be 0600 \(chmod 600"):
        read_secret_file(path, "gateway.tokens.x.secret")
    path.chmod(0o600)
    assert read_secret_file(path, "x") == "s3cret"
