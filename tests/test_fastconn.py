"""FastConn, FastReader and FastWriter keep pynsq's FIN/REQ/TOUCH/RDY behaviour on real nsqd."""
from __future__ import annotations

import asyncio
import struct

import pytest

from nsqhttp import channel_stats, wait_until
from pipeline.client.fastclient import FastReader, FastWriter
from pipeline.client.fastconn import FastConn
from pipeline.client.nsqclient import NsqPublisher


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">ll", len(payload) + 4, kind) + payload


def test_frames_split_anywhere_across_reads_are_decoded_once_each_in_order():
    frames = [frame(0, b"OK"), frame(0, b"_heartbeat_"), frame(1, b"E_INVALID x"), frame(0, b"")]
    wire = b"".join(frames)
    for cut in range(len(wire) + 1):
        conn = FastConn("127.0.0.1", 1)
        seen = []
        conn.on("data", lambda conn, data: seen.append(data))
        for chunk in (wire[:cut], wire[cut:]):  # as the transport hands reads over
            conn._on_read(chunk)
        assert seen == [f[4:] for f in frames], f"cut at {cut}"
        assert not conn._rbuf


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _consume(nsqd, topic, on_message, *, max_in_flight, msg_timeout=None, done):
    kwargs = {"msg_timeout": msg_timeout} if msg_timeout else {}
    reader = FastReader(topic=topic, channel="c", message_handler=None, nsqd_tcp_addresses=[nsqd.tcp],
                        max_in_flight=max_in_flight, max_tries=0, **kwargs)
    reader.set_message_handler(lambda m: on_message(reader, m))
    try:
        while not done():
            await asyncio.sleep(0.01)
        # FIN/REQ are written on the next loop iteration; close() would drop what is not written yet.
        flushed = [conn.send(b"NOP\n") for conn in reader.conns.values()]
        await asyncio.gather(*flushed)
    finally:
        reader.close()


@pytest.mark.integration
def test_writer_mpub_answers_each_callback_and_reader_respects_max_in_flight(nsqd, topic):
    received, finished, peak = [], [], [0]

    async def main():
        writer = FastWriter([nsqd.tcp], reconnect_interval=1.0)
        while not any(c.connected() for c in writer.conns.values()):
            await asyncio.sleep(0.01)
        answers = []
        for i in range(50):
            writer.mpub(topic, [b"%d" % (i * 100 + j) for j in range(100)], callback=lambda c, d: answers.append(d))
        while len(answers) < 50:
            await asyncio.sleep(0.01)
        assert answers == [b"OK"] * 50

        def on_message(reader, message):
            conn = next(iter(reader.conns.values()))
            peak[0] = max(peak[0], conn.in_flight)
            message.enable_async()
            received.append(message.body)
            asyncio.get_running_loop().call_later(0.001, lambda: (message.finish(), finished.append(1)))

        await _consume(nsqd, topic, on_message, max_in_flight=100, done=lambda: len(finished) >= 5000)

    run(main())
    assert sorted(int(b) for b in received) == list(range(5000))
    assert 0 < peak[0] <= 100
    wait_until(lambda: channel_stats(nsqd.http, topic, "c")["in_flight_count"] == 0, 10)
    stats = channel_stats(nsqd.http, topic, "c")
    assert (stats["depth"], stats["requeue_count"], stats["timeout_count"]) == (0, 0, 0)


@pytest.mark.integration
def test_requeue_redelivers_with_attempts_and_touch_prevents_a_timeout(nsqd, topic):
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(topic, [b"a", b"b", b"c"])
    attempts: dict[bytes, list[int]] = {}
    touched_done = []

    def on_message(reader, message):
        message.enable_async()
        attempts.setdefault(message.body, []).append(message.attempts)
        if message.attempts == 1:
            message.requeue(backoff=False, delay=0)
            return
        # second delivery: hold it past the 1 s message timeout, touching it meanwhile
        loop = asyncio.get_running_loop()
        for t in (0.4, 0.8, 1.2):
            loop.call_later(t, message.touch)
        loop.call_later(1.5, lambda: (message.finish(), touched_done.append(message.body)))

    run(_consume(nsqd, topic, on_message, max_in_flight=10, msg_timeout=1, done=lambda: len(touched_done) == 3))
    assert attempts == {b"a": [1, 2], b"b": [1, 2], b"c": [1, 2]}
    wait_until(lambda: channel_stats(nsqd.http, topic, "c")["in_flight_count"] == 0, 10)
    stats = channel_stats(nsqd.http, topic, "c")
    assert stats["requeue_count"] == 3 and stats["timeout_count"] == 0 and stats["depth"] == 0


def test_a_batch_handler_gets_the_messages_of_a_read_in_order_between_other_frames():
    def message(n: int) -> bytes:
        return frame(2, struct.pack(">qH", 7, 1) + b"%016d" % n + b"body%d" % n)

    wire = message(1) + message(2) + frame(0, b"CLOSE_WAIT") + message(3)
    conn = FastConn("127.0.0.1", 1)
    seen = []
    conn.on_messages = lambda c, messages: seen.append([m.body for m in messages])
    conn.on("data", lambda conn, data: seen.append(data[4:]))
    conn._on_read(wire)
    assert seen == [[b"body1", b"body2"], b"CLOSE_WAIT", [b"body3"]]
    assert conn.in_flight == 3


@pytest.mark.integration
def test_batch_handler_and_finish_all_consume_everything_once(nsqd, topic):
    with NsqPublisher(nsqd.tcp) as publisher:
        publisher.publish(topic, [b"%d" % i for i in range(20_000)])
    received, sizes = [], []

    async def main():
        from pipeline.client.fastconn import finish_all

        def on_messages(messages):
            sizes.append(len(messages))
            received.extend(m.body for m in messages)
            asyncio.get_running_loop().call_soon(finish_all, messages)

        reader = FastReader(topic=topic, channel="c", batch_handler=on_messages, nsqd_tcp_addresses=[nsqd.tcp],
                            max_in_flight=500)
        try:
            def drained():
                stats = channel_stats(nsqd.http, topic, "c")
                return stats if len(received) >= 20_000 and stats["depth"] == stats["in_flight_count"] == 0 else None

            stats = await asyncio.to_thread(wait_until, drained, 20)
        finally:
            reader.close()
        return stats

    stats = run(main())
    assert sorted(int(b) for b in received) == list(range(20_000))  # each once: nothing redelivered
    assert stats["in_flight_count"] == 0 and stats["requeue_count"] == 0 and stats["timeout_count"] == 0
    assert max(sizes) > 1  # reads did carry several messages


def test_a_batch_handler_refuses_max_tries():
    with pytest.raises(ValueError, match="needs max_tries=0"):
        FastReader(topic="t", channel="c", batch_handler=lambda ms: None, nsqd_tcp_addresses=["127.0.0.1:1"],
                   max_tries=3)


@pytest.mark.integration
@pytest.mark.parametrize("with_lookupd", [True, False])
def test_a_reader_reconnects_to_a_restarted_nsqd_within_seconds(nsq_factory, topic, with_lookupd):
    # Given a reader of an nsqd (with a lookupd it polls once a minute: no poll will bring it back)
    lookupd = nsq_factory.lookupd() if with_lookupd else None
    lookupd_tcp = [lookupd.tcp] if lookupd else []
    nsqd = nsq_factory.nsqd("n0", lookupd_tcp=lookupd_tcp)
    discovery = {"lookupd_http_addresses": [lookupd.http], "lookupd_poll_interval": 60} if lookupd else {}

    async def main() -> float:
        reader = FastReader(topic=topic, channel="c", batch_handler=lambda messages: None, max_in_flight=10,
                            nsqd_tcp_addresses=[nsqd.tcp], **discovery)
        try:
            await _until(lambda: nsqd.tcp in reader.conns)
            # When nsqd restarts on its port: the connection is lost, and refused while it is down
            nsqd.stop()
            await _until(lambda: nsqd.tcp not in reader.conns)
            await asyncio.sleep(1.5)  # at least one attempt refused
            restarted = await asyncio.to_thread(nsq_factory.restart, nsqd, lookupd_tcp=lookupd_tcp)
            back = asyncio.get_running_loop().time()
            # Then the reader is subscribed again within seconds (pynsq: the next lookupd poll, or 15 s)
            await _until(lambda: (c := reader.conns.get(restarted.tcp)) is not None and c.last_rdy > 0)
            return asyncio.get_running_loop().time() - back
        finally:
            reader.close()

    assert run(main(), timeout=60) < 3.0


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
