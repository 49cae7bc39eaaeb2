"""The worker runtime on real nsqd: delivery, dead letters, crashes and drains."""
from __future__ import annotations

import threading
from collections import Counter

import msgpack
import numpy as np
import pytest

from harness import Workers, collect, ids_seen, sigterm, write_topology
from nsqhttp import channel_stats, http_pub, topic_stats, wait_until
from pipeline.client.nsqclient import NsqPublisher
from producers.numbers import produce_numbers

pytestmark = pytest.mark.integration


def sieve(n: int) -> np.ndarray:
    is_prime = np.ones(n + 1, dtype=bool)
    is_prime[:2] = False
    for p in range(2, int(n ** 0.5) + 1):
        if is_prime[p]:
            is_prime[p * p::p] = False
    return is_prime


def distinct_ids_at_least(topics, n):
    return lambda got: len(set(ids_seen(got, topics))) >= n


@pytest.fixture
def workers(tmp_path):
    running: list[Workers] = []
    yield running
    for w in running:
        w.stop_all()


def start(workers, path, http, topic, replicas=2) -> Workers:
    w = Workers(path)
    workers.append(w)
    for k in range(replicas):
        w.start(k)
    w.wait_subscribed(http, topic, replicas)
    return w


def test_100k_numbers_through_two_replicas_match_a_sieve(nsq_cluster, tmp_path, topic, workers):
    nsqd = nsq_cluster.nsqd
    path, names = write_topology(tmp_path, nsqd, topic, lookupd=nsq_cluster.lookupd)
    start(workers, path, nsqd.http, names.input)

    produce_numbers(nsqd.tcp, names.input, 1, 100_000, run_id="r")
    got = collect(nsqd.tcp, names.outputs, distinct_ids_at_least([names.prime, names.non_prime], 100_000), 180)

    ids = ids_seen(got, [names.prime, names.non_prime])
    assert Counter(ids).most_common(1)[0][1] == 1, "no fault was injected, so no id may repeat"
    assert set(ids) == {f"r-{n}" for n in range(1, 100_001)}
    assert not got.get(names.dead)
    reference = sieve(100_000)
    for out, flag in ((names.prime, True), (names.non_prime, False)):
        for record in got[out]:
            assert record["prime"] is flag and bool(reference[record["number"]]) is flag, record
            assert isinstance(record["ts"], int)
    assert len(got[names.prime]) == 9592


def test_json_by_http_pub_and_msgpack_by_tcp_both_classified(nsqd, tmp_path, topic, workers):
    path, names = write_topology(tmp_path, nsqd, topic)
    start(workers, path, nsqd.http, names.input, replicas=1)

    # Given a JSON body posted as curl would, and a msgpack body over TCP
    assert http_pub(nsqd.http, names.input, b'{"number": 7}') == (200, "OK")
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(names.input, [msgpack.packb({"id": "mp-1", "number": 8, "note": "x"})])

    got = collect(nsqd.tcp, names.outputs, lambda g: len(g[names.prime]) >= 1 and len(g[names.non_prime]) >= 1, 30)
    assert got[names.prime] == [{"number": 7, "prime": True}]
    # non_prime is a msgpack topic in this topology: the record survives both codecs
    assert got[names.non_prime] == [{"id": "mp-1", "number": 8, "note": "x", "prime": False}]


BAD = [b"not json at all", b"{}", b'{"number": "abc"}', b'{"number": 1.5}', b'{"number": true}',
       b'{"number": 1180591620717411303424}']


def test_bad_messages_are_dead_lettered_with_reasons_and_good_ones_flow(nsqd, tmp_path, topic, workers):
    path, names = write_topology(tmp_path, nsqd, topic)
    w = start(workers, path, nsqd.http, names.input, replicas=1)

    good = [b'{"id": "g-%d", "number": %d}' % (n, n) for n in range(1, 201)]
    mixed = [body for pair in zip(good[:len(BAD)], BAD) for body in pair] + good[len(BAD):]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(names.input, mixed)

    got = collect(nsqd.tcp, names.outputs,
                  lambda g: len(g[names.dead]) >= len(BAD) and len(ids_seen(g, names.outputs[:2])) >= 200, 30)
    assert sorted(ids_seen(got, names.outputs[:2])) == sorted(f"g-{n}" for n in range(1, 201))
    dead = {d["body"].encode(): d for d in got[names.dead]}
    assert set(dead) == set(BAD)
    assert "not a JSON object or msgpack map" in dead[BAD[0]]["reason"]
    for body in BAD[1:]:
        assert "'number'" in dead[body]["reason"], dead[body]
    assert {d["stage"] for d in dead.values()} == {"primes"} and all(d["attempts"] == 1 for d in dead.values())
    assert all(p.poll() is None for p in w.procs), "the worker must keep running"


def _publish_in_background(tcp, topic, count, rate):
    thread = threading.Thread(target=produce_numbers, args=(tcp, topic, 1, count),
                              kwargs={"rate": rate, "run_id": "k"}, daemon=True)
    thread.start()
    return thread


def _wait_for_progress(http, topic, at_least):
    wait_until(lambda: ((topic_stats(http, topic) or {}).get("message_count", 0)) >= at_least, 30,
               message=f"{topic} never reached {at_least} messages")


def test_sigkill_of_one_replica_loses_nothing(nsqd, tmp_path, topic, workers):
    path, names = write_topology(tmp_path, nsqd, topic, msg_timeout=3, publish_timeout=2)
    w = start(workers, path, nsqd.http, names.input)
    producer = _publish_in_background(nsqd.tcp, names.input, 30_000, rate=10_000)

    _wait_for_progress(nsqd.http, names.non_prime, 3_000)
    w.procs[0].kill()
    producer.join(60)

    got = collect(nsqd.tcp, names.outputs, distinct_ids_at_least(names.outputs[:2], 30_000), 90)
    assert set(ids_seen(got, names.outputs[:2])) == {f"k-{n}" for n in range(1, 30_001)}
    assert not got.get(names.dead)


def test_sigterm_drains_exits_zero_and_duplicates_nothing(nsqd, tmp_path, topic, workers):
    path, names = write_topology(tmp_path, nsqd, topic)
    w = start(workers, path, nsqd.http, names.input)
    producer = _publish_in_background(nsqd.tcp, names.input, 30_000, rate=10_000)

    _wait_for_progress(nsqd.http, names.non_prime, 3_000)
    sigterm(w.procs[0])
    assert w.procs[0].wait(timeout=10) == 0
    producer.join(60)

    got = collect(nsqd.tcp, names.outputs, distinct_ids_at_least(names.outputs[:2], 30_000), 90)
    ids = ids_seen(got, names.outputs[:2])
    assert set(ids) == {f"k-{n}" for n in range(1, 30_001)}
    assert [i for i, c in Counter(ids).items() if c > 1] == []


def test_a_record_the_handler_keeps_failing_is_dead_lettered_after_max_tries(nsqd, tmp_path, topic, workers):
    path, names = write_topology(tmp_path, nsqd, topic, handler="stages_for_tests:fail_on_13", max_tries=3,
                                 requeue_delay=0.05, max_backoff_duration=0.2, batch={"size": 64, "wait_ms": 5})
    start(workers, path, nsqd.http, names.input, replicas=1)

    produce_numbers(nsqd.tcp, names.input, 1, 500, run_id="h")
    got = collect(nsqd.tcp, names.outputs,
                  lambda g: len(g[names.dead]) >= 1 and len(ids_seen(g, names.outputs[:2])) >= 499, 60)

    assert set(ids_seen(got, names.outputs[:2])) == {f"h-{n}" for n in range(1, 501)} - {"h-13"}
    [dead] = got[names.dead]
    assert '"number":13' in dead["body"] and dead["attempts"] == 3
    assert "ValueError: unlucky 13" in dead["reason"] and "max_tries 3" in dead["reason"]
    # The dead letter keeps the handler's last frames: where in the stage's own file it raised
    assert 'stages_for_tests.py", line' in dead["traceback"] and "in fail_on_13" in dead["traceback"]
    assert dead["traceback"].endswith("ValueError: unlucky 13") and "processing.py" not in dead["traceback"]


def test_a_handler_that_returns_none_has_every_record_dead_lettered_none_dropped(nsqd, tmp_path, topic, workers):
    import ast
    import inspect
    import json

    import stages_for_tests
    path, names = write_topology(tmp_path, nsqd, topic, handler="stages_for_tests:forgets_return", max_tries=3,
                                 requeue_delay=0.05, max_backoff_duration=0.2, batch={"size": 64, "wait_ms": 5})
    w = start(workers, path, nsqd.http, names.input, replicas=1)

    # When a stage forgets its `return` on 50 records
    produce_numbers(nsqd.tcp, names.input, 1, 50, run_id="n")
    got = collect(nsqd.tcp, names.outputs, lambda g: len(g[names.dead]) >= 50, 60)

    # Then each is dead-lettered once, after max_tries, with the reason, and nothing else is published
    dead = got[names.dead]
    assert sorted(json.loads(d["body"])["id"] for d in dead) == sorted(f"n-{k}" for k in range(1, 51))
    assert {(d["reason"], d["attempts"]) for d in dead} == \
        {("handler returned None; return {} to emit nothing (attempt 3 of max_tries 3)", 3)}
    assert "traceback" not in dead[0]
    wait_until(lambda: (s := channel_stats(nsqd.http, names.input, "primes")) is not None
               and s["depth"] == s["in_flight_count"] == s["deferred_count"] == 0, 30,
               message="the input channel never drained")
    sigterm(w.procs[0])
    assert w.procs[0].wait(timeout=15) == 0
    log = (tmp_path / "worker-0-0.log").read_text()
    stats = ast.literal_eval(log.split("stopped: ", 1)[1].splitlines()[0])
    assert stats["finished"] == stats["dead_lettered"] == 50, stats  # none finished silently
    assert not got.get(names.prime) and not got.get(names.non_prime)
    # And the worker said so once, at ERROR, naming the handler's file:line
    line = inspect.getsourcelines(stages_for_tests.forgets_return)[1]
    errors = [entry for entry in log.splitlines() if " ERROR " in entry]
    assert len(errors) == 1 and f"stages_for_tests.py:{line}: handler returned None" in errors[0], errors


def test_batched_envelopes_flow_and_a_bad_record_inside_one_is_dead_lettered_alone(nsqd, tmp_path, topic, workers):
    from pipeline.records.envelope import pack

    path, names = write_topology(tmp_path, nsqd, topic, packs={"input": 100, "prime": 50})
    start(workers, path, nsqd.http, names.input)

    produce_numbers(nsqd.tcp, names.input, 1, 10_000, pack=100, run_id="e")
    bad = [{"id": "x-1", "number": 1}, {"id": "x-bad", "number": "abc"}, {"id": "x-3", "number": 3}]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(names.input, pack(bad, 100))

    got = collect(nsqd.tcp, names.outputs, lambda g: len(g[names.dead]) >= 1
                  and len(set(ids_seen(g, names.outputs[:2]))) >= 10_002, 60)
    ids = ids_seen(got, names.outputs[:2])
    assert set(ids) == {f"e-{n}" for n in range(1, 10_001)} | {"x-1", "x-3"}
    assert len(got[names.prime]) == 1229 + 1  # primes below 10,000, plus x-3
    [dead] = got[names.dead]
    assert dead["envelope_index"] == 1 and "'number'" in dead["reason"]
    assert dead["body"] == '{"id":"x-bad","number":"abc"}'
    prime_stats = topic_stats(nsqd.http, names.prime)
    assert prime_stats["message_count"] < 1230 / 10, "prime is packed 50 records per message"


def test_the_worker_identifies_with_the_stage_output_buffer_settings(nsqd, tmp_path, topic):
    import asyncio
    import time

    from pipeline.config import load_topology
    from pipeline.runtime.worker import Worker
    path, names = write_topology(tmp_path, nsqd, topic, output_buffer_timeout=40, output_buffer_size=-1)

    async def identified() -> tuple[int, int]:
        worker = Worker(load_topology(path), "primes")
        await worker.start()
        try:
            deadline = time.monotonic() + 10
            while not any(c.connected() for c in worker.reader.conns.values()):  # nsqd accepted the IDENTIFY
                assert time.monotonic() < deadline, "the reader never connected"
                await asyncio.sleep(0.01)
            conn = next(iter(worker.reader.conns.values()))
            return conn.output_buffer_timeout, conn.output_buffer_size
        finally:
            await worker.drain()

    assert asyncio.run(identified()) == (40, -1)  # and nsqd accepted them: the connection is up


def test_channel_backlog_counts_queued_and_deferred_messages(nsqd, topic):
    from pipeline.client import nsqd_http
    assert nsqd_http.channel_backlog(nsqd.http, topic, "c") == 0  # no such topic yet
    nsqd_http.create_channel(nsqd.http, topic, "c")
    with NsqPublisher(nsqd.tcp) as publisher:
        publisher.publish(topic, [b'{"n": %d}' % i for i in range(7)])
    nsqd_http.request(nsqd.http, "/pub", {"topic": topic, "defer": "60000"}, body=b'{"n": 7}')
    assert wait_until(lambda: nsqd_http.channel_backlog(nsqd.http, topic, "c") == 8, 10)
