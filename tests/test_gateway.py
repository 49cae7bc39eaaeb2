"""``pipeline gateway`` against a real nsqd: every answer it promises, and what lands on the topic.

The gateway runs as a subprocess of the test (``pipeline gateway -t``) on a free
port; what it published is read back from nsqd with a subscriber, and what it
refused is checked to have published nothing (nsqd's message count).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsqhttp import get_text, wait_until
from pipeline.client import nsqd_http
from pipeline.records.codecs import decode
from pipeline.config.credentials import SecretError, read_secret_file
from pipeline.edge.gateway import TokenBucket, schema_violation, split_binary
from pipeline.edge.gateway_batch import Coalescer
from pipeline.client.nsqclient import MAX_BODY_SIZE, NsqSubscriber
from pipeline.config import MAX_MSG_SIZE, GatewaySpec
from pipeline.ops.processes import NsqProcess, free_port, start_nsqd, start_process
from pipeline.client.publisher import MPUB_MAX_COUNT

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


def start_gateway(tmp_path: Path, nsqd, topic: str) -> Gw:
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
    return Gw(proc, nsqd, topic, f"{topic}_free", f"{topic}_other")


@pytest.fixture
def gw(nsqd, tmp_path, topic):
    gateway = start_gateway(tmp_path, nsqd, topic)
    yield gateway
    gateway.proc.stop()
    assert not gateway.proc.alive()


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


# Pipelining and coalescing: raw HTTP/1.1 on keep-alive sockets, answers parsed by http.client.

class _SharedFile:
    """Lets http.client read several pipelined answers from one buffered socket file (it closes each one's)."""

    def __init__(self, file):
        self.file = file

    def makefile(self, *args, **kwargs):
        return self

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self.file, name)


def raw(path: str, body: bytes = b"", token: str | None = WRITER, method: str = "POST", headers=()) -> bytes:
    """One HTTP/1.1 request; a ``Transfer-Encoding: chunked`` header means ``body`` is already chunked."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", *headers]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if "Transfer-Encoding: chunked" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def pipelined(address: str, *per_connection: list[bytes]) -> list[tuple[list, bool]]:
    """Send each list of requests at once on its own connection, then read every answer.

    Returns each connection's ``[(status, JSON or text, headers)]`` and whether the gateway closed it after.
    """
    host, port = address.split(":")
    socks = [socket.create_connection((host, int(port)), timeout=10) for _ in per_connection]
    try:
        for sock, requests in zip(socks, per_connection):
            sock.sendall(b"".join(requests))
        results = []
        for sock, requests in zip(socks, per_connection):
            file = sock.makefile("rb")
            answers = []
            for _ in requests:
                resp = http.client.HTTPResponse(_SharedFile(file))
                resp.begin()
                text = resp.read().decode()
                answers.append((resp.status, json.loads(text) if text.startswith("{") else text, resp.headers))
            sock.settimeout(0.5)
            try:
                closed = file.read(1) == b""
            except TimeoutError:
                closed = False
            results.append((answers, closed))
        return results
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.integration
def test_pipelined_requests_are_answered_in_order_and_a_bad_one_does_not_affect_the_others(gw):
    # Given: one connection with good and bad requests pipelined in one write, ending with Connection: close
    requests = [
        raw(f"/pub?topic={gw.topic}", b'{"number": 1}'),
        raw(f"/pub?topic={gw.topic}", b'{"number": "x"}'),                       # schema
        raw(f"/mpub?topic={gw.topic}", b'{"number": 2}\n{"number": 3}'),
        raw(f"/pub?topic={gw.topic}", b'{"number": 90}', token="w-nope"),          # unknown token
        raw(f"/pub?topic={gw.free}", b"x" * (MAX_MSG + 1)),                       # over the limit: body dropped
        raw(f"/pub?topic={gw.other}", b'{"number": 91}'),                         # token may not
        raw(f"/pub?topic={gw.free}", b"s1", token=SLOW),
        raw(f"/pub?topic={gw.free}", b"s2", token=SLOW),
        raw(f"/pub?topic={gw.free}", b"s3", token=SLOW),                          # over the burst of 2
        raw(f"/pub?topic={gw.topic}", chunked(b'{"numb', b'er": 4}'), headers=["Transfer-Encoding: chunked"]),
        raw("/ping", method="GET", token=None),
        raw(f"/pub?topic={gw.topic}", method="GET"),
        raw(f"http://gw/pub?topic={gw.free}", b"abs"),                            # absolute-form target
        raw(f"/pub?topic={gw.topic}", b'{"number": 5}', headers=["Connection: close"]),
    ]
    [(answers, closed)] = pipelined(gw.proc.http, requests)
    # Then: one answer per request, in order; the good ones published, in order; the connection closed at the end
    assert [a[0] for a in answers] == [200, 400, 200, 401, 413, 403, 200, 200, 429, 200, 200, 405, 200, 200]
    assert [a[1]["error"] for a in answers if isinstance(a[1], dict)] == \
        ["SCHEMA", "UNAUTHORIZED", "MSG_TOO_BIG", "FORBIDDEN", "RATE_LIMITED", "METHOD_NOT_ALLOWED"]
    assert int(answers[8][2]["Retry-After"]) > 0 and answers[3][2]["WWW-Authenticate"].startswith("Bearer")
    assert answers[-1][2]["Connection"] == "close" and closed
    assert [decode(b)["number"] for b in gw.read(gw.topic, 5)] == [1, 2, 3, 4, 5]
    assert gw.read(gw.free, 3) == [b"s1", b"s2", b"abs"]
    assert (gw.count(gw.topic), gw.count(gw.free), gw.count(gw.other)) == (5, 3, 0)


@pytest.mark.integration
def test_oversize_chunked_body_connection_close_and_malformed_http_each_close_the_connection(gw):
    body = chunked(b"y" * MAX_MSG, b"y")
    (answers, closed), (pings, ping_closed), (garbled, garbled_closed) = pipelined(
        gw.proc.http, [raw(f"/pub?topic={gw.free}", body, headers=["Transfer-Encoding: chunked"])],
        [raw("/ping", method="GET", token=None, headers=["Connection: close"])],
        [raw(f"/pub?topic={gw.free}", b"ok"), b"POST /pub HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
    assert [(a[0], a[1]["error"]) for a in answers] == [(413, "MSG_TOO_BIG")] and closed
    assert [a[:2] for a in pings] == [(200, "OK")] and ping_closed  # answered from its headers, then closed
    assert [a[0] for a in garbled] == [200, 400] and garbled[1][1]["error"] == "BAD_REQUEST" and garbled_closed
    assert gw.read(gw.free, 1) == [b"ok"] and gw.count(gw.free) == 1  # of the three, only the good one


@pytest.mark.integration
def test_coalescing_across_connections_lands_every_good_message_exactly_once(gw):
    # Given: 4 connections, 60 pipelined /pub each, every 10th one breaking the schema
    per_connection, good = [], set()
    for c in range(4):
        requests = []
        for i in range(60):
            number = c * 1000 + i
            if i % 10 == 9:
                requests.append(raw(f"/pub?topic={gw.topic}", b'{"numbr": %d}' % number))
            else:
                requests.append(raw(f"/pub?topic={gw.topic}", b'{"number": %d}' % number))
                good.add(number)
        per_connection.append(requests)
    results = pipelined(gw.proc.http, *per_connection)
    # Then: each good one 200, each bad one 400, and nsqd holds each good message once
    for answers, _ in results:
        assert [a[0] for a in answers] == [400 if i % 10 == 9 else 200 for i in range(60)]
    numbers = [decode(b)["number"] for b in gw.read(gw.topic, len(good))]
    assert sorted(numbers) == sorted(good) and gw.count(gw.topic) == len(good)


@pytest.mark.integration
def test_nsqd_down_answers_every_request_of_a_coalesced_batch_503(gw):
    gw.nsqd.stop()
    requests = [raw(f"/pub?topic={gw.free}", b"m%d" % i) for i in range(5)]
    for answers, _ in pipelined(gw.proc.http, requests, requests, requests):
        assert [a[0] for a in answers] == [503] * 5
        assert {a[1]["error"] for a in answers} <= {"NSQD_UNAVAILABLE", "NSQD_ERROR"}


@pytest.mark.integration
def test_a_coalesced_mpub_nsqd_refuses_is_503_for_every_request_in_it_and_publishes_nothing(nsq_bin, tmp_path, topic):
    # Given: an nsqd whose message limit (100 bytes) is below the gateway's (2,000), so it refuses the MPUB
    strict = start_nsqd(tmp_path / "nsqd", extra=["--max-msg-size=100"])
    gw = start_gateway(tmp_path, strict, topic)
    try:
        # When: three /pub of one read form one MPUB, the middle one too big for nsqd
        requests = [raw(f"/pub?topic={gw.free}", body) for body in (b"a", b"b" * 150, b"c")]
        [(answers, _)] = pipelined(gw.proc.http, requests)
        # Then: all three 503, nothing published; the gateway reconnects and publishes again
        assert [(a[0], a[1]["error"]) for a in answers] == [(503, "NSQD_ERROR")] * 3
        assert gw.count(gw.free) == 0
        wait_until(lambda: gw.post(f"/pub?topic={gw.free}", b"d")[0] == 200, 10)
        assert gw.read(gw.free, 1) == [b"d"]
    finally:
        gw.proc.stop()
        strict.stop()


class _Recorder:
    """A publisher that records each MPUB and lets the test answer it (the coalescer is what is tested)."""

    def __init__(self):
        self.mpubs: list[tuple[str, list[bytes], asyncio.Future]] = []

    def connected(self) -> bool:
        return True

    def mpub(self, topic, bodies):
        future = asyncio.get_running_loop().create_future()
        self.mpubs.append((topic, list(bodies), future))
        return future


class _Waiter:
    def __init__(self):
        self.answer = None

    def succeed(self):
        self.answer = 200

    def fail(self, error):
        self.answer = (error.status, error.error)


def test_coalescer_sends_one_mpub_per_topic_per_iteration_within_nsqds_limits():
    async def scenario():
        publisher = _Recorder()
        coalescer = Coalescer(publisher, max_body_size=4 + 3 * (4 + 10), timeout=0.2)
        waiters = [_Waiter() for _ in range(6)]
        for i, waiter in enumerate(waiters[:4]):  # 4 messages of 10 bytes: the 4th does not fit
            coalescer.add("a", [b"%010d" % i], 4 + 4 + 10, waiter)  # framed: count, then size and bytes
        coalescer.add("b", [b"x", b"y"], 4 + 2 * 5, waiters[4])
        await asyncio.sleep(0)  # the next IOLoop iteration sends what is open
        assert [(t, len(b)) for t, b, _ in publisher.mpubs] == [("a", 3), ("a", 1), ("b", 2)]
        publisher.mpubs[0][2].set_result(b"OK")
        publisher.mpubs[2][2].set_exception(RuntimeError("E_BAD_MESSAGE"))
        coalescer.add("a", [b"z" * (MPUB_MAX_COUNT + 1)] * (MPUB_MAX_COUNT + 1), 8, waiters[5])  # alone, whole
        await asyncio.sleep(0.3)  # past the timeout of the unanswered ones
        return publisher, waiters, coalescer

    publisher, waiters, coalescer = asyncio.run(scenario())
    assert [w.answer for w in waiters] == [200, 200, 200, (503, "NSQD_TIMEOUT"), (503, "NSQD_ERROR"),
                                           (503, "NSQD_TIMEOUT")]
    assert len(publisher.mpubs[3][1]) == MPUB_MAX_COUNT + 1 and coalescer.idle()


def _near_request(method: bytes, path: bytes, query: list[bytes], headers: list[bytes], body: bytes,
                  framing: str) -> bytes:
    if framing == "length":
        headers = [*headers, b"Content-Length: %d" % len(body)]
    elif framing == "chunked":
        headers, body = [*headers, b"Transfer-Encoding: chunked"], chunked(body) if body else b"0\r\n\r\n"
    elif framing == "wrong length":
        headers = [*headers, b"Content-Length: %d" % (len(body) + 3)]
    return (method + b" " + path + b"?" + b"".join(query) + b" HTTP/1.1\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


_REQUESTS = st.one_of(
    st.builds(
        _near_request,
        st.sampled_from([b"POST", b"PUT", b"GET", b"DELETE"]),
        st.sampled_from([b"/pub", b"/mpub", b"/ping", b"/", b"http://gw/pub"]),
        st.lists(st.sampled_from([b"topic=", b"{free}", b"{topic}", b"binary=true", b"&", b"=", b"%", b"%ff",
                                  b"%c3%a9", b"+", b"x"]), max_size=8),
        st.lists(st.sampled_from([f"Authorization: Bearer {WRITER}".encode(), b"Authorization: Bearer",
                                  b"Authorization: Basic eA==", b"Expect: 100-continue", b"Connection: close",
                                  b"Connection: keep-alive", b"X: \xff\xfe"]), max_size=3),
        st.one_of(st.binary(max_size=60), st.sampled_from([b'{"number": 1}', b'{"number": 1}\n{"number": 2}',
                                                            b"\x00\x00\x00\x01\x00\x00\x00\x01a"])),
        st.sampled_from(["length", "chunked", "wrong length", "none"])),
    st.binary(max_size=200))


@pytest.mark.integration
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.lists(_REQUESTS, min_size=1, max_size=3))
def test_random_bytes_never_break_the_gateway(gw, data):
    # Given: garbage, or near-requests with odd methods, queries, headers and bodies, on one connection
    host, port = gw.proc.http.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"".join(data).replace(b"{free}", gw.free.encode()).replace(b"{topic}", gw.topic.encode()))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):  # the gateway closes once it read our end
            received += chunk
    # Then: only well-formed answers came back, no request handling failed, and the gateway still serves
    for line in received.split(b"\r\n"):
        if line.startswith(b"HTTP/"):
            assert line.split(b" ")[1] in (b"100", b"200", b"400", b"401", b"403", b"404", b"405", b"413", b"429")
    assert "Traceback" not in gw.proc.log_path.read_text()
    assert gw.post(f"/pub?topic={gw.free}", b"still")[0] == 200
