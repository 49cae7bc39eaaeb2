"""The compiled frame scanner and FastConn's batched reads built on it (no nsqd needed: reads are fed by hand)."""
from __future__ import annotations

import asyncio
import socket
import struct

import nsq
import pytest

from pipeline.client import frames

from pipeline.records import jit
from pipeline.client.fastconn import FastConn, FastMessage, _Wire, finish_all


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">ll", len(payload) + 4, kind) + payload


def message(n: int, attempts: int = 1, timestamp: int = 1_700_000_000_000_000_000, body: bytes | None = None) -> bytes:
    return frame(2, struct.pack(">qH", timestamp, attempts) + b"%016d" % n + (b"body%d" % n if body is None else body))


class Sent:
    """What a FastConn would write: its send() collected, without a socket."""

    def __init__(self, conn: FastConn):
        self.data: list[bytes] = []
        conn.send = conn.write = self.data.append


def batched_conn():
    """A FastConn with a batch handler; returns it and the list of what it handed over, in order."""
    conn = FastConn("127.0.0.1", 1)
    seen: list = []
    conn.on_messages = lambda c, messages: seen.append(messages)
    conn.on("data", lambda conn, data: seen.append(data))
    conn.on("error", lambda conn, error: seen.append(error))
    return conn, seen


@pytest.fixture(params=["compiled", "plain"])
def read_path(request, monkeypatch):
    """Run a read test with the compiled scanner, and again with the plain-Python reads a worker uses until
    its kernels are loaded (pipeline.records.jit)."""
    if request.param == "plain":
        monkeypatch.setattr(jit, "_deferred", True)
        monkeypatch.setattr(jit, "_ready", {k: v for k, v in jit._ready.items() if k != "pipeline.client.frames"})
    return request.param


def feed(conn: FastConn, *chunks: bytes) -> None:
    """Hand ``chunks`` to ``conn`` as its transport hands over what each read from the socket brought."""
    for chunk in chunks:
        conn._on_read(chunk)


# -- the scanner -----------------------------------------------------------------


def test_scan_finds_each_complete_frame_with_a_message_header():
    wire = frame(0, b"OK") + message(7, attempts=3, timestamp=-5) + frame(1, b"E_BAD") + b"\x00\x00\x00"
    rows, end, valid = frames.scan(wire)
    assert valid and end == len(wire) - 3  # the incomplete size is left for the next read
    assert [wire[r[frames.START]:r[frames.END]] for r in rows] == [
        wire[4:10], message(7, 3, -5)[4:], frame(1, b"E_BAD")[4:]]
    assert rows[:, frames.KIND].tolist() == [0, 2, 1]
    assert (rows[1, frames.TIMESTAMP], rows[1, frames.ATTEMPTS]) == (-5, 3)
    assert frames.not_messages(rows) == [0, 2]


def test_scan_marks_frames_too_short_for_their_header_malformed():
    wire = frame(2, b"short") + struct.pack(">l", 2) + b"xy" + message(1)
    rows, end, valid = frames.scan(wire)
    assert valid and end == len(wire)
    assert rows[:, frames.KIND].tolist() == [frames.MALFORMED, frames.MALFORMED, 2]


def test_scan_stops_at_max_frames_and_goes_on_from_where_it_stopped():
    wire = b"".join(message(n) for n in range(10))
    rows, end, _ = frames.scan(wire, 0, max_frames=4)
    more, end2, _ = frames.scan(wire, end, max_frames=100)
    assert len(rows) == 4 and len(more) == 6 and end2 == len(wire)


def test_scan_reports_a_negative_frame_size_as_invalid():
    wire = message(1) + struct.pack(">l", -8) + b"x" * 12
    rows, end, valid = frames.scan(wire)
    assert not valid and len(rows) == 1 and end == len(message(1))


# -- batched reads -----------------------------------------------------------------


def test_messages_split_anywhere_across_reads_are_handed_over_once_each_in_order(read_path):
    wire = message(1) + message(2, body=b"") + frame(0, b"_heartbeat_") + message(3, attempts=9)
    for cut in range(len(wire) + 1):
        conn, seen = batched_conn()
        feed(conn, wire[:cut], wire[cut:])
        flat = [m if isinstance(m, bytes) else [(x.id, x.body, x.attempts) for x in m] for m in seen]
        merged = [item for part in flat for item in (part if isinstance(part, list) else [part])]
        assert merged == [(b"%016d" % 1, b"body1", 1), (b"%016d" % 2, b"", 1), b"\x00\x00\x00\x00_heartbeat_",
                          (b"%016d" % 3, b"body3", 9)], f"cut at {cut}"
        assert conn._rbuf == b"" and conn.in_flight == 3


def test_a_read_longer_than_one_scan_hands_over_every_message(read_path):
    count = frames.MAX_FRAMES * 2 + 5
    conn, seen = batched_conn()
    feed(conn, b"".join(message(n) for n in range(count)))
    assert [int(m.id) for batch in seen for m in batch] == list(range(count))


def test_a_malformed_message_frame_is_logged_and_the_rest_still_arrive(caplog, read_path):
    conn, seen = batched_conn()
    conn.on("data", conn._on_data)  # as pynsq's Reader registers it: the frame reaches FastConn._on_data
    feed(conn, message(1) + frame(2, b"short") + message(2))
    batches = [[m.body for m in part] for part in seen if isinstance(part, list)]
    assert batches == [[b"body1"], [b"body2"]]
    assert "uncaught exception in data event" in caplog.text


async def _corrupt_read(conn: FastConn, wire: bytes) -> bool:
    """Feed ``wire`` to ``conn`` over a real (socketpair) transport; return whether the transport got closed."""
    ours, theirs = socket.socketpair()
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: _Wire(conn), sock=ours)
        feed(conn, wire)
        return transport.is_closing()
    finally:
        theirs.close()
        ours.close()


def test_a_negative_frame_size_closes_the_connection_with_an_error(read_path):
    conn, seen = batched_conn()
    assert asyncio.run(_corrupt_read(conn, message(1) + struct.pack(">l", -1) + b"rest"))
    [batch, error] = seen
    assert [m.body for m in batch] == [b"body1"]
    assert isinstance(error, nsq.protocol.IntegrityError) and "negative frame size" in str(error)


def test_a_negative_frame_size_without_a_batch_handler_closes_too():
    conn = FastConn("127.0.0.1", 1)
    errors = []
    conn.on("error", lambda conn, error: errors.append(error))
    assert asyncio.run(_corrupt_read(conn, struct.pack(">l", -1) + b"rest"))
    assert len(errors) == 1 and "negative frame size" in str(errors[0])


# -- answering ---------------------------------------------------------------------


def test_finish_all_sends_one_fin_payload_per_connection_and_skips_answered_messages():
    first, second = FastConn("127.0.0.1", 1), FastConn("127.0.0.1", 2)
    sent = {first: Sent(first), second: Sent(second)}
    first.in_flight = second.in_flight = 10
    messages = [FastMessage(conn, b"%016d" % n, b"", 0, 1) for n, conn in enumerate([first, second, first, first])]
    messages[2]._has_responded = True  # e.g. requeued already
    finish_all(messages)
    assert sent[first].data == [b"FIN %016d\nFIN %016d\n" % (0, 3)]
    assert sent[second].data == [b"FIN %016d\n" % 1]
    assert (first.in_flight, second.in_flight) == (8, 9)
    assert all(m.has_responded() for m in messages)
    finish_all(messages)  # nothing left to answer
    assert len(sent[first].data) == 1


def test_a_message_is_answered_once():
    conn = FastConn("127.0.0.1", 1)
    sent = Sent(conn)
    conn.in_flight = 1
    message = FastMessage(conn, b"0" * 16, b"body", 0, 1)
    assert message.is_async() and not message.has_responded()
    message.touch()
    message.finish()
    with pytest.raises(nsq.Error, match="already answered"):
        message.requeue()
    with pytest.raises(nsq.Error, match="already answered"):
        message.touch()
    assert sent.data[0].startswith(b"TOUCH " + b"0" * 16) and sent.data[1] == b"FIN " + b"0" * 16 + b"\n"
