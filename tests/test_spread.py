"""Publishing across several nsqd nodes: round-robin, health tracking, failover.

NodePool is tested on a fake clock; the publishers against real nsqd nodes,
one of which refuses (a smaller --max-msg-size), is not listening, or is
stopped in the middle of a run.
"""
from __future__ import annotations

import asyncio
import threading

import orjson
import pytest

from nsqhttp import topic_stats, wait_until
from pipeline.errors import PublishError
from pipeline.client.nodepool import NodePool
from pipeline.client.nsqclient import NsqSubscriber
from pipeline.ops.processes import free_port
from pipeline.client.publisher import Publisher
from pipeline.client.spread import SpreadPublisher
from producers.numbers import produce_numbers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _count(http: str, topic: str) -> int:
    stats = topic_stats(http, topic)
    return int(stats["message_count"]) if stats else 0


def _bodies(n: int, size: int = 20, start: int = 0) -> list[bytes]:
    return [orjson.dumps({"id": f"r{i}", "pad": "x" * size}) for i in range(start, start + n)]


# -- NodePool ------------------------------------------------------------------


def test_pool_round_robin_skips_a_failed_node_until_its_backoff_ends() -> None:
    clock = Clock()
    pool = NodePool(["a", "b", "c"], backoff=1.0, clock=clock)
    assert [pool.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    pool.failed("b", "connection refused")
    assert [pool.pick() for _ in range(4)] == ["c", "a", "c", "a"]
    clock.now += 1.0
    assert "b" in {pool.pick() for _ in range(3)}


def test_pool_backoff_doubles_per_consecutive_failure_and_success_resets_it() -> None:
    clock = Clock()
    pool = NodePool(["a", "b"], backoff=1.0, max_backoff=3.0, clock=clock)
    for expected in (1.0, 2.0, 3.0, 3.0):
        pool.failed("a")
        pool.failed("a", "another batch of the same lost connection")  # no longer
        assert pool.nodes["a"].down_until - clock.now == expected
        clock.now = pool.nodes["a"].down_until
    pool.succeeded("a")
    assert pool.is_up("a") and pool.nodes["a"].failures == 0 and pool.nodes["a"].published == 1


def test_pool_with_every_node_down_offers_the_first_to_return_and_honours_exclude() -> None:
    clock = Clock()
    pool = NodePool(["a", "b"], backoff=1.0, clock=clock)
    pool.failed("b")
    clock.now += 1.0
    pool.failed("b")  # second failure in a row: down for 2 s
    pool.failed("a")  # first: down for 1 s
    assert not pool.is_up("a") and not pool.is_up("b")
    assert pool.pick() == "a"
    assert pool.pick(exclude={"a"}) == "b"
    assert pool.pick(exclude={"a", "b"}) is None
    assert pool.pick(usable=lambda address: address == "b") == "b"


def test_pool_key_keeps_a_key_on_its_node_while_up() -> None:
    clock = Clock()
    pool = NodePool(["a", "b", "c"], clock=clock)
    first = pool.pick(key="ticks.1")
    assert all(pool.pick(key="ticks.1") == first for _ in range(5))
    pool.failed(first)
    moved = pool.pick(key="ticks.1")
    assert moved != first and pool.pick(key="ticks.1") == moved


# -- SpreadPublisher on real nsqd -------------------------------------------------------


def test_spread_publisher_spreads_round_robin_and_counts_each_ack_once(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    with SpreadPublisher([n.tcp for n in nodes]) as pub:
        for i in range(30):
            pub.send_mpub(topic, _bodies(100, start=i * 100), records=200)
        pub.flush()
    assert pub.acked == 3000 and pub.acked_records == 6000 and pub.failovers == 0
    counts = [_count(n.http, topic) for n in nodes]
    assert counts == [1000, 1000, 1000]
    assert [pub.by_node[n.tcp] for n in nodes] == counts


def test_spread_publisher_skips_a_node_that_is_not_listening(nsq_factory, topic) -> None:
    live = nsq_factory.nsqd("live")
    dead = f"127.0.0.1:{free_port()}"
    assert produce_numbers([dead, live.tcp], topic, 1, 5000, chunk=250) == 5000
    assert _count(live.http, topic) == 5000


def test_a_refused_batch_goes_to_the_next_node_and_is_published_once(nsq_factory, topic) -> None:
    # Given: node "small" refuses messages above 64 bytes (E_BAD_MESSAGE), node "big" takes them.
    small = nsq_factory.nsqd("small", extra=["--max-msg-size=64"])
    big = nsq_factory.nsqd("big")
    with SpreadPublisher([small.tcp, big.tcp]) as pub:
        for i in range(10):
            pub.send_mpub(topic, _bodies(50, size=100, start=i * 50))
        pub.flush()
        health = {h.address: h for h in pub.health()}
    # Then: every batch was acknowledged by "big", exactly once; "small" is recorded as failing.
    assert pub.acked == 500 and pub.by_node == {big.tcp: 500}
    assert _count(big.http, topic) == 500 and _count(small.http, topic) == 0
    assert health[small.tcp].failures >= 1 and "E_BAD_MESSAGE" in health[small.tcp].last_error


def test_a_batch_every_node_refuses_raises_with_each_reason(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"s{i}", extra=["--max-msg-size=64"]) for i in range(2)]
    with SpreadPublisher([n.tcp for n in nodes]) as pub:
        with pytest.raises(PublishError, match="every nsqd refused MPUB") as raised:
            pub.mpub(topic, _bodies(3, size=100))
    assert all(n.tcp in str(raised.value) for n in nodes)
    assert pub.acked == 0


def test_a_node_stopped_mid_run_hands_its_unacknowledged_batches_to_the_others(nsq_factory, topic) -> None:
    # Given: two nodes and a producer publishing 40,000 numbers at 20,000/s.
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(2)]
    progress: list[int] = []
    result: dict[str, object] = {}

    def produce() -> None:
        try:
            result["acked"] = produce_numbers([n.tcp for n in nodes], topic, 1, 40_000, rate=20_000, chunk=200,
                                              run_id="run", on_progress=progress.append)
        except Exception as e:  # reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=produce)
    thread.start()
    # When: node 0 is stopped (SIGTERM) once a quarter is acknowledged.
    wait_until(lambda: progress and progress[-1] >= 10_000, 20.0, message="producer made no progress")
    nodes[0].stop()
    thread.join(30.0)
    assert not thread.is_alive() and "error" not in result, result
    # Then: every number is on some node; node 0's queue, persisted at SIGTERM, is read after a restart.
    assert result["acked"] == 40_000
    restarted = nsq_factory.restart(nodes[0])
    seen: set[str] = set()
    for node in (restarted, nodes[1]):
        with NsqSubscriber(node.tcp, topic, "check") as sub:
            for message in sub.messages(timeout=0.5):
                seen.add(orjson.loads(message.body)["id"])
    assert seen == {f"run-{n}" for n in range(1, 40_001)}


def test_worker_publisher_fails_over_from_a_refusing_node(nsq_factory, topic) -> None:
    small = nsq_factory.nsqd("small", extra=["--max-msg-size=64"])
    big = nsq_factory.nsqd("big")

    async def run() -> Publisher:
        publisher = Publisher([small.tcp, big.tcp])
        try:
            await publisher.wait_connected(10.0)
            wait_both = asyncio.get_running_loop().time() + 10.0
            while len([c for c in publisher.writer.conns.values() if c.connected()]) < 2:
                assert asyncio.get_running_loop().time() < wait_both, "second connection never ready"
                await asyncio.sleep(0.02)
            for i in range(6):
                await publisher.publish({topic: _bodies(10, size=100, start=i * 10)}, timeout=10.0)
            return publisher
        finally:
            publisher.close()

    publisher = asyncio.run(run())
    assert _count(big.http, topic) == 60 and _count(small.http, topic) == 0
    health = {h.address: h for h in publisher.health()}
    assert health[big.tcp].published == 6 and health[small.tcp].failures >= 1


def test_worker_publisher_spreads_over_healthy_nodes(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(2)]

    async def run() -> None:
        publisher = Publisher([n.tcp for n in nodes])
        try:
            deadline = asyncio.get_running_loop().time() + 10.0
            while len([c for c in publisher.writer.conns.values() if c.connected()]) < 2:
                assert asyncio.get_running_loop().time() < deadline, "connections never ready"
                await asyncio.sleep(0.02)
            for i in range(10):
                await publisher.publish({topic: _bodies(10, start=i * 10)}, timeout=10.0)
        finally:
            publisher.close()

    asyncio.run(run())
    assert [_count(n.http, topic) for n in nodes] == [50, 50]
