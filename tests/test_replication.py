"""Replicated topics: every message on two nsqd, acknowledged when both took it, applied once.

The topology rules and the deduplication window are tested on their own;
the publishers against real nsqd nodes (three, one or two of which go down);
the whole path (Producer -> two primes workers -> outputs) on three real
nsqd, one of which is SIGKILLed while records flow.
"""
from __future__ import annotations

import asyncio

import orjson
import pytest
import yaml

from nsqhttp import topic_stats, wait_until
from pipeline.client.publisher import Publisher
from pipeline.client.spread import SpreadPublisher
from pipeline.config import load_topology
from pipeline.errors import TopologyError
from pipeline.ops.processes import free_port
from pipeline.runtime.dedup import Deduper, digest


def _count(http: str, topic: str) -> int:
    stats = topic_stats(http, topic)
    return int(stats["message_count"]) if stats else 0


def _bodies(n: int, start: int = 0) -> list[bytes]:
    return [orjson.dumps({"id": i}) for i in range(start, start + n)]


def _topology(tmp_path, nodes: int = 3, **overrides) -> dict:
    doc = {"nsq": {"nsqd": [{"name": f"n{i}", "tcp": f"127.0.0.1:{4000 + i}", "http": f"127.0.0.1:{4100 + i}"}
                            for i in range(nodes)], "var_dir": "var"},
           "topics": {"numbers": {"replication": 2, "partitions": 2, "key": "id"},
                      "prime": {"replication": 2}, "non_prime": {}},
           "stages": {"primes": {"handler": "consumers.primes:classify", "input": "numbers", "channel": "primes",
                                 "outputs": ["prime", "non_prime"], "replicas": 2}}}
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
    return doc


def _load(tmp_path, doc: dict):
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)


# -- the topology ----------------------------------------------------------------------------


def test_a_replicated_topic_is_read_partition_by_partition_and_its_copies_are_known(tmp_path) -> None:
    topology = _load(tmp_path, _topology(tmp_path))
    assert [topology.input_topic("primes", k) for k in range(2)] == ["numbers.0", "numbers.1"]
    assert topology.copies("numbers") == topology.copies("numbers.1") == topology.copies("numbers.dead") == 2
    assert topology.copies("prime") == 2 and topology.copies("non_prime") == 1 and topology.copies("other") == 1
    # a partition stays on one node (its key); a keyed stage's outputs too; a plain topic goes round-robin
    assert topology.placement("numbers.1") == (2, "numbers.1")
    assert topology.placement("prime") == (2, None)
    assert topology.placement("non_prime", sticky=True) == (1, "non_prime")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"topics.numbers.replication": 3, "nsq.nsqd": [{"name": "n0", "tcp": "127.0.0.1:4000",
                                                      "http": "127.0.0.1:4100"}, {"name": "n1", "tcp": "127.0.0.1:4001",
                                                                                  "http": "127.0.0.1:4101"}]},
     r"topology.yaml:\d+:\d+: topics.numbers.replication: 3 copies need 3 nsqd, each holding one; nsq.nsqd has 2"),
    ({"topics.numbers": {"replication": 2}},
     r"topology.yaml:\d+:\d+: stages.primes.replicas: topic 'numbers' is replicated, so the copies of a message"
     r" must meet in one replica"),
    ({"topics.numbers.replication": 4}, r"topology.yaml:\d+:\d+: topics.numbers.replication: must be <= 3"),
])
def test_a_replication_the_cluster_or_the_stage_cannot_honour_fails_at_load_naming_its_line(
        tmp_path, overrides, message) -> None:
    with pytest.raises(TopologyError, match=message):
        _load(tmp_path, _topology(tmp_path, **overrides))


def test_an_unreplicated_partitioned_topic_still_needs_a_keyed_stage(tmp_path) -> None:
    with pytest.raises(TopologyError, match="a stage reading it must be keyed"):
        _load(tmp_path, _topology(tmp_path, **{"topics.numbers.replication": 1}))


# -- the window of seen messages --------------------------------------------------------------


class Message:
    def __init__(self, body: bytes, node: str = "a") -> None:
        self.body, self.node = body, node


def test_a_copy_rides_with_its_lead_and_a_later_copy_is_finished_unprocessed() -> None:
    dedup = Deduper(1000)
    a1, a2, b1 = Message(b"a", "n0"), Message(b"a", "n1"), Message(b"b", "n0")
    leads, seen = dedup.admit([a1, b1, a2])
    assert leads == [a1, b1] and seen == []  # a2 waits for a1
    finish, requeue = dedup.settle(leads, finished=[a1])  # a1 finished, b1 requeued
    assert finish == [a2] and requeue == []
    assert dedup.seen(digest(b"a")) and not dedup.seen(digest(b"b"))
    leads, seen = dedup.admit([Message(b"a", "n2"), b1])
    assert leads == [b1] and [m.node for m in seen] == ["n2"]


def test_the_copies_of_a_requeued_lead_are_requeued_with_it() -> None:
    dedup = Deduper(1000)
    lead, copy = Message(b"x"), Message(b"x")
    dedup.admit([lead])
    assert dedup.admit([copy]) == ([], [])  # in hand elsewhere: held
    assert dedup.settle([lead], finished=[]) == ([], [copy])
    assert dedup.admit([copy]) == ([copy], [])  # back again: now it is the lead


def test_the_window_forgets_the_older_generation_when_the_newer_fills() -> None:
    dedup = Deduper(1000)  # two generations of 500
    for start in range(0, 1200, 100):
        batch = [Message(str(i).encode()) for i in range(start, start + 100)]
        leads, _ = dedup.admit(batch)
        dedup.settle(leads, finished=leads)
    assert 500 <= len(dedup) <= 1000
    assert dedup.seen(digest(b"1199")) and not dedup.seen(digest(b"0"))


def test_the_window_survives_a_restart_through_its_checkpoint_and_a_torn_end_loses_one_digest(tmp_path,
                                                                                           caplog) -> None:
    path = tmp_path / "state" / "primes-0.seen"

    def take(dedup: Deduper, start: int, count: int) -> None:
        leads, _ = dedup.admit([Message(str(i).encode()) for i in range(start, start + count)])
        dedup.settle(leads, finished=leads)

    dedup = Deduper(1000, path, every=0)
    take(dedup, 0, 300)
    assert dedup.checkpoint() and not dedup.checkpoint(force=True)  # nothing new the second time
    take(dedup, 300, 100)
    size = path.stat().st_size
    assert dedup.checkpoint() and path.stat().st_size == size + 100 * 8  # only the new digests are appended
    take(dedup, 400, 300)  # past 500: the newer generation became the older
    assert dedup.checkpoint()
    again = Deduper(1000, path)
    assert len(again) == 700 and again.seen(digest(b"0")) and again.seen(digest(b"699"))
    take(dedup, 700, 10)
    assert dedup.checkpoint()
    path.write_bytes(path.read_bytes()[:-5])  # a crash in the middle of an append
    torn = Deduper(1000, path)
    assert len(torn) == 709 and not torn.seen(digest(b"709")) and torn.seen(digest(b"708"))
    path.write_bytes(b"something else")
    assert len(Deduper(1000, path)) == 0
    assert "is not a checkpoint of seen messages" in caplog.text


# -- the publishers ----------------------------------------------------------------------------


def _where(nodes, topic: str) -> list[int]:
    return [_count(n.http, topic) for n in nodes]


def test_spread_publisher_puts_each_batch_on_two_nodes_and_counts_it_once(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    keyed = f"{topic}.1"
    with SpreadPublisher([n.tcp for n in nodes], copies=lambda t: 2) as pub:
        for i in range(12):
            pub.send_mpub(topic, _bodies(50, start=i * 50))
            pub.send_mpub(keyed, _bodies(10, start=i * 10), key=keyed)
        pub.flush()
    assert pub.acked == 12 * 60 and pub.under_replicated == 0
    assert sum(_where(nodes, topic)) == 2 * 600 and max(_where(nodes, topic)) <= 600
    # a keyed batch's two copies always go to the same two nodes (its order holds on each)
    assert sorted(_where(nodes, keyed)) == [0, 120, 120]


def test_spread_publisher_with_one_node_left_publishes_one_copy_and_counts_the_missing(nsq_factory, topic,
                                                                                       caplog) -> None:
    live = nsq_factory.nsqd("live")
    dead = f"127.0.0.1:{free_port()}"
    with SpreadPublisher([dead, live.tcp], copies=lambda t: 2) as pub:
        for i in range(5):
            pub.send_mpub(topic, _bodies(100, start=i * 100))
        pub.flush()
    assert pub.acked == 500 and pub.under_replicated == 500
    assert _count(live.http, topic) == 500
    assert "kept fewer copies than the topic's 2" in caplog.text


def test_worker_publisher_keeps_two_copies_while_two_nodes_are_up_then_goes_on_degraded(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]

    async def publish(publisher: Publisher, start: int) -> None:
        for i in range(5):
            await publisher.publish({topic: _bodies(20, start=start + i * 20)}, timeout=10.0)

    async def run() -> Publisher:
        publisher = Publisher([n.tcp for n in nodes], placement=lambda t: (2, None))
        try:
            deadline = asyncio.get_running_loop().time() + 10.0
            while len([c for c in publisher.writer.conns.values() if c.connected()]) < 3:
                assert asyncio.get_running_loop().time() < deadline, "connections never ready"
                await asyncio.sleep(0.02)
            await publish(publisher, 0)
            assert sum(_where(nodes, topic)) == 200 and publisher.under_replicated == 0
            nodes[0].stop()
            while publisher._connected(nodes[0].tcp):
                await asyncio.sleep(0.02)
            before = sum(_where(nodes[1:], topic))
            await publish(publisher, 100)
            assert sum(_where(nodes[1:], topic)) == before + 200  # both copies of each new message
            assert publisher.under_replicated == 0
            nodes[1].stop()
            while publisher._connected(nodes[1].tcp):
                await asyncio.sleep(0.02)
            before = _count(nodes[2].http, topic)
            await publish(publisher, 200)
            assert _count(nodes[2].http, topic) == before + 100  # the one node left took each message once
            return publisher
        finally:
            publisher.close()

    publisher = asyncio.run(run())
    assert publisher.under_replicated == 100


# -- status --------------------------------------------------------------------------------------


def test_status_says_when_a_replicated_topic_gets_fewer_copies_than_it_asks(nsq_factory, tmp_path) -> None:
    from io import StringIO

    from rich.console import Console

    from pipeline.observe.status import collect
    from pipeline.observe.views import print_status

    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    doc = _topology(tmp_path, **{"nsq.nsqd": [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in nodes]})
    topology = _load(tmp_path, doc)
    states = lambda: {r.topic: r.state for r in collect(topology, interval=0.0).replication}  # noqa: E731
    assert states() == {"numbers": "ok", "prime": "ok"}
    nodes[0].stop()
    assert states()["numbers"] == "ok: 1 nsqd down, the copies go to the others"
    nodes[1].stop()
    report = collect(topology, interval=0.0)
    assert report.replication[0].state.startswith("degraded: 1 of 3 nsqd up, new messages get 1 of 2 copies")
    assert report.to_dict()["replication"][0]["getting"] == 1
    out = StringIO()
    print_status(report, Console(file=out, width=250))
    assert "replicated topics" in out.getvalue() and "degraded: 1 of 3 nsqd up" in out.getvalue()


def test_produce_from_a_file_puts_two_copies_and_says_when_a_node_could_not_take_its_copy(nsq_factory,
                                                                                          tmp_path) -> None:
    import subprocess
    import sys

    live = [nsq_factory.nsqd(f"n{i}") for i in range(2)]
    records = tmp_path / "orders.jsonl"
    records.write_text("".join(f'{{"id": {i}}}\n' for i in range(300)))

    def produce(nodes: list[dict]):
        doc = {"nsq": {"nsqd": nodes, "var_dir": "var"}, "topics": {"orders": {"replication": 2}}}
        path = tmp_path / "topology.yaml"
        path.write_text(yaml.safe_dump(doc))
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "produce", "orders", "--from", str(records),
                               "--no-resume", "-t", str(path)], capture_output=True, text=True, timeout=120)

    nodes = [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in live]
    run = produce(nodes)
    assert run.returncode == 0 and "300 acknowledged" in run.stderr + run.stdout, run.stderr
    assert [_count(n.http, "orders") for n in live] == [300, 300] and "warning" not in run.stderr
    nodes[1] = {"name": "gone", "tcp": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}
    run = produce(nodes)
    assert run.returncode == 0, run.stderr
    assert "warning: 300 copies of messages to the replicated topic orders went nowhere" in run.stderr
    assert _count(live[0].http, "orders") == 600


def test_a_keyed_stages_output_stays_on_one_node_while_it_is_up_then_moves_to_one_other(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]

    async def run() -> list[list[int]]:
        publisher = Publisher([n.tcp for n in nodes], placement=lambda t: (1, t))  # what a keyed worker is given
        seen = []
        try:
            deadline = asyncio.get_running_loop().time() + 10.0
            while len([c for c in publisher.writer.conns.values() if c.connected()]) < 3:
                assert asyncio.get_running_loop().time() < deadline, "connections never ready"
                await asyncio.sleep(0.02)
            for i in range(10):
                await publisher.publish({topic: _bodies(10, start=i * 10)}, timeout=10.0)
            seen.append(_where(nodes, topic))
            home = seen[0].index(100)
            nodes[home].stop()
            while publisher._connected(nodes[home].tcp):
                await asyncio.sleep(0.02)
            for i in range(10, 20):
                await publisher.publish({topic: _bodies(10, start=i * 10)}, timeout=10.0)
            seen.append([0 if k == home else _count(n.http, topic) for k, n in enumerate(nodes)])
            return seen
        finally:
            publisher.close()

    before, after = asyncio.run(run())
    assert sorted(before) == [0, 0, 100]  # round-robin would have spread them over the three
    assert sorted(after) == [0, 0, 100]  # the next node in the key's order took all of them


def test_dead_ls_and_show_count_and_show_a_replicated_stages_letter_once(nsq_factory, tmp_path) -> None:
    from io import StringIO

    from pipeline.observe.deadletters import show_letters, summarize
    from pipeline.records.codecs import encode_json
    from pipeline.records.deadletter import DeadLetter

    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    doc = _topology(tmp_path, **{"nsq.nsqd": [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in nodes]})
    topology = _load(tmp_path, doc)
    letters = [DeadLetter("boom", "primes", "numbers.0", "primes", 5, f"{i:016x}", encode_json({"n": i})).encode()
               for i in range(30)]
    with SpreadPublisher([n.tcp for n in nodes], copies=topology.copies) as pub:
        for i in range(0, 30, 10):
            pub.send_mpub("numbers.dead", letters[i:i + 10])
        pub.flush()
    assert sum(_where(nodes, "numbers.dead")) == 60  # two copies of each
    [row] = summarize(topology)
    assert (row.count, row.read, dict(row.reasons)) == (30, 30, {"boom": 30})
    out = StringIO()
    assert show_letters(topology, "primes", count=100, out=out, as_json=True) == 30
    assert sorted(orjson.loads(orjson.loads(line)["body"])["n"] for line in out.getvalue().splitlines()) == \
        list(range(30))


def test_a_dead_lettered_body_is_not_remembered_so_its_redrive_is_processed() -> None:
    dedup = Deduper(1000)
    bad, good = Message(b"bad"), Message(b"good")
    leads, _ = dedup.admit([bad, good])
    dedup.settle(leads, finished=leads, dead=[bad])  # both finished: bad as a dead letter
    assert dedup.seen(digest(b"good")) and not dedup.seen(digest(b"bad"))
    assert dedup.admit([Message(b"bad")])[0]  # re-driven: a lead, not a copy
