"""A replicated pipeline on three real nsqd loses nothing when one is SIGKILLed, and applies each record once.

numbers (2 copies, 2 partitions by id) -> two primes workers -> prime and
non_prime (2 copies each). The producer publishes through pipeline.Producer
at a steady rate; one nsqd is SIGKILLed halfway (what it held in memory, in
flight included, dies with it) and started again on its data dir. Every id
must come out, with no replay, and the second copies must have been
finished unprocessed: the outputs hold two copies per record, not four.
A keyed twin (ticks -> features, both replicated) must give the offline
reference's features for every (symbol, seq) through the same fault.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from collections import Counter

import msgpack
import orjson
import yaml

from harness import Workers
from nsqhttp import channel_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.client.nsqclient import NsqSubscriber
from pipeline.client.producer import Producer
from pipeline.config import load_topology

COUNT = 20_000
RATE = 4_000
MAX_IN_FLIGHT = 200


def _write(tmp_path, nodes, topic: str):
    prime, non_prime = f"{topic}_prime", f"{topic}_non_prime"
    doc = {"nsq": {"nsqd": [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in nodes],
                   "var_dir": str(tmp_path / "var")},
           "topics": {topic: {"replication": 2, "partitions": 2, "key": "id"},
                      prime: {"replication": 2}, non_prime: {"replication": 2}},
           "stages": {"primes": {"handler": "consumers.primes:classify", "input": topic, "channel": "primes",
                                 "outputs": {"prime": prime, "non_prime": non_prime}, "replicas": 2,
                                 "max_in_flight": MAX_IN_FLIGHT, "msg_timeout": 5, "publish_timeout": 2,
                                 "batch": {"size": 100, "wait_ms": 5}}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    for node in nodes:
        for out in (prime, non_prime):
            nsqd_http.create_channel(node.http, out, "check")
    return path, [prime, non_prime]


def test_one_nsqd_sigkilled_mid_run_loses_no_record_and_copies_are_applied_once(nsq_factory, tmp_path, topic):
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    path, outputs = _write(tmp_path, nodes, topic)
    workers = Workers(path)
    acked: list[int] = []
    result: dict[str, object] = {}

    def produce() -> None:
        try:
            with Producer(load_topology(path), topic, chunk=100) as producer:
                producer.on_progress = acked.append
                records = ({"id": f"r-{n}", "number": n} for n in range(1, COUNT + 1))
                result["acked"] = producer.publish(records, rate=RATE)
        except Exception as e:  # reported below
            result["error"] = e

    try:
        for replica in range(2):
            workers.start(replica)
        for k in range(2):
            workers.wait_subscribed(nodes[0].http, f"{topic}.{k}", 1)
        thread = threading.Thread(target=produce)
        thread.start()
        wait_until(lambda: acked and acked[-1] >= COUNT // 2, 30.0, message="the producer made no progress")
        os.kill(nodes[1].pid, signal.SIGKILL)
        wait_until(lambda: not nodes[1].alive(), 10.0, message="nsqd outlived its SIGKILL")
        nodes[1] = nsq_factory.restart(nodes[1])
        thread.join(60.0)
        assert not thread.is_alive() and result.get("acked") == COUNT, result

        copies: Counter[str] = Counter()
        subs = [NsqSubscriber(n.tcp, t, "check") for n in nodes for t in outputs]

        def idle(node, topic: str, channel: str) -> bool:
            stats = channel_stats(node.http, topic, channel)
            return not stats or int(stats["depth"]) + int(stats["in_flight_count"]) == 0

        def drained() -> bool:
            for sub in subs:
                for message in sub.messages(timeout=0.05):
                    copies[orjson.loads(message.body)["id"]] += 1
            # every record out, nothing left for the workers on any node, every output copy read
            return len(copies) == COUNT and all(idle(n, f"{topic}.{k}", "primes") for n in nodes for k in range(2)) \
                and all(idle(n, t, "check") for n in nodes for t in outputs)
        try:
            wait_until(drained, 60.0, message=lambda: f"{COUNT - len(copies)} of {COUNT} records never came out")
        finally:
            for sub in subs:
                sub.close()
    finally:
        workers.stop_all()
    # Then: no record lost without any replay; each applied once, but for what the kill put in doubt
    assert set(copies) == {f"r-{n}" for n in range(1, COUNT + 1)}
    extra = sum(copies.values()) - 2 * COUNT
    assert extra <= 2 * 2 * MAX_IN_FLIGHT, f"{extra} output messages beyond two copies per record"
    finished = sum(int(m) for m in re.findall(r"'copies_finished': (\d+)", workers.log_tail()))
    assert finished >= COUNT // 2, f"only {finished} second copies were finished unprocessed"


def test_a_keyed_replicated_pipeline_gives_the_reference_features_through_an_nsqd_sigkill(nsq_factory, tmp_path):
    from test_keyed_worker import FLOATS, InProcessWorker

    from chaos.market_reference import reference_features
    from pipeline.runtime.worker import Worker
    from producers.ticks import synthetic_ticks

    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    doc = {"nsq": {"nsqd": [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in nodes],
                   "var_dir": str(tmp_path / "var")},
           "topics": {"ticks": {"codec": "msgpack", "key": "symbol", "partitions": 2, "replication": 2},
                      "features": {"codec": "msgpack", "key": "symbol", "seq": "feature_seq", "replication": 2}},
           "stages": {"features": {"handler": "consumers.features:Features", "input": "ticks", "channel": "features",
                                   "outputs": ["features"], "keyed": True, "replicas": 2, "max_in_flight": 300,
                                   "msg_timeout": 5, "publish_timeout": 2, "batch": {"size": 16, "wait_ms": 1},
                                   "params": {"window": 20}}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    for node in nodes:
        nsqd_http.create_channel(node.http, "features", "check")
    topology = load_topology(path)
    ticks = list(synthetic_ticks(8, 8_000, seed=5, run_id="r"))
    acked: list[int] = []
    workers = [InProcessWorker(Worker(topology, "features", replica=k), lambda w: None) for k in range(2)]
    try:
        with Producer(topology, "ticks", chunk=100, keep_seq=True) as producer:
            producer.on_progress = acked.append
            thread = threading.Thread(target=producer.publish, args=(ticks,), kwargs={"rate": 2_000})
            thread.start()
            wait_until(lambda: acked and acked[-1] >= 4_000, 30.0, message="the producer made no progress")
            os.kill(nodes[2].pid, signal.SIGKILL)
            wait_until(lambda: not nodes[2].alive(), 10.0, message="nsqd outlived its SIGKILL")
            nodes[2] = nsq_factory.restart(nodes[2])
            thread.join(60.0)
            assert not thread.is_alive()
        assert producer.acked == len(ticks)
        got: dict[tuple, dict] = {}
        subs = [NsqSubscriber(n.tcp, "features", "check") for n in nodes]

        def complete() -> bool:
            for sub in subs:
                for message in sub.messages(timeout=0.05):
                    f = msgpack.unpackb(message.body)
                    first = got.setdefault((f["symbol"], f["seq"]), f)
                    assert all(first[n] == f[n] for n in FLOATS)  # a copy, or a re-applied tick: the same features
            return len(got) == len(ticks)
        try:
            wait_until(complete, 60.0, message=lambda: f"{len(ticks) - len(got)} features never came out")
        finally:
            for sub in subs:
                sub.close()
    finally:
        for worker in workers:
            worker.stop()
    reference = reference_features(ticks, window=20)
    assert set(got) == set(reference)
    for key, expected in reference.items():
        assert all(abs(got[key][n] - expected[n]) <= 1e-9 * max(1.0, abs(expected[n])) for n in FLOATS), key
