"""InFlightSubscriber on a real nsqd: its caller answers each message; what it leaves is requeued, never lost."""
from __future__ import annotations

import socket

import pytest

from nsqhttp import channel_stats, wait_until
from pipeline.client.inflight import InFlightSubscriber
from pipeline.client.nsqclient import publish_records

pytestmark = pytest.mark.integration


def figures(http: str, topic: str) -> tuple[int, int]:
    found = channel_stats(http, topic, "c") or {}
    return found.get("depth", 0), found.get("in_flight_count", 0)


def test_what_is_not_answered_is_requeued_at_once_on_release(nsqd):
    publish_records(nsqd.tcp, "t", [b'{"n": %d}' % i for i in range(5)])
    with InFlightSubscriber(nsqd.tcp, "t", "c", rdy=10, msg_timeout=30) as sub:
        got = list(sub.receive(timeout=0.5))
        assert len(got) == 5 and figures(nsqd.http, "t") == (0, 5)  # nothing answered by receiving
        sub.finish(got[:2])
        assert set(sub.unanswered) == {m.id for m in got[2:]}
    assert figures(nsqd.http, "t") == (3, 0)  # requeued at once, not after msg_timeout


def test_a_dead_subscribers_messages_come_back_after_its_own_msg_timeout(nsqd):
    publish_records(nsqd.tcp, "t", [b'{"n": 1}', b'{"n": 2}'])
    sub = InFlightSubscriber(nsqd.tcp, "t", "c", rdy=10, msg_timeout=1)
    assert len(list(sub.receive(timeout=0.5))) == 2
    sub._sock.shutdown(socket.SHUT_RDWR)  # gone without a word, as a SIGKILLed process
    sub.close()
    assert figures(nsqd.http, "t") == (0, 2)
    # nsqd scans a channel for timeouts once it is in its scan list, refreshed every 5 s: a new one waits longer
    wait_until(lambda: figures(nsqd.http, "t") == (2, 0), 10, message="in flight after msg_timeout 1 s")
    with InFlightSubscriber(nsqd.tcp, "t", "c", rdy=10, msg_timeout=30) as again:
        assert [m.attempts for m in again.receive(timeout=0.5)] == [2, 2]
