"""Worker metrics: the replica's /metrics endpoint agrees with what it processed."""
from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Workers, collect, ids_seen, write_topology
from nsqhttp import http_pub, wait_until
from pipeline.runtime.middleware.metrics import BulkHistogram, e2e_seconds
from pipeline.ops.processes import free_port
from producers.numbers import produce_numbers

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:PORT/metrics as {(name, sorted labels): value}."""
    text = _LOCAL.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    want = {"stage": "primes", "replica": "0", **labels}
    return samples.get((name, tuple(sorted(want.items()))), 0.0)


def test_bulk_histogram_counts_each_value_in_its_le_bucket():
    h = BulkHistogram([0.1, 1.0])
    h.observe_many(np.array([0.05, 0.1, 0.5, 2.0]))
    buckets, total = h.snapshot()
    assert buckets == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert total == pytest.approx(2.65)


def test_e2e_seconds_skips_records_without_an_integer_ts():
    now = 10_000_000_000
    got = e2e_seconds([{"ts": now - 2_000_000_000}, {"ts": "x"}, {}, {"ts": now + 5}], now)
    assert got.tolist() == [2.0, 0.0]


@pytest.mark.integration
def test_scraped_counters_match_what_the_replica_processed(nsqd, tmp_path, topic):
    # Given one replica with its metrics endpoint on a free port
    port = free_port()
    path, names = write_topology(tmp_path, nsqd, topic, replicas=1, metrics_port=port)
    workers = Workers(path)
    try:
        workers.start(0)
        workers.wait_subscribed(nsqd.http, names.input, 1)
        # When 2,000 numbers and one undecodable message go through it
        produce_numbers(nsqd.tcp, names.input, 1, 2000, run_id="m")
        assert http_pub(nsqd.http, names.input, b"not json") == (200, "OK")
        got = collect(nsqd.tcp, names.outputs,
                      lambda g: len(set(ids_seen(g, [names.prime, names.non_prime]))) >= 2000 and g[names.dead], 60)
        # Then, once the FINs are counted, the counters equal what was published and received
        samples = wait_until(lambda: (s := scrape(port)) and value(s, "pipeline_messages_finished_total") == 2001
                             and s, 10, message="finished counter never reached 2001")
    finally:
        workers.stop_all()
    primes, others = len(got[names.prime]), len(got[names.non_prime])
    assert primes == 303 and primes + others == 2000
    assert value(samples, "pipeline_messages_in_total", topic=names.input) == 2001
    assert value(samples, "pipeline_messages_out_total", topic=names.prime) == primes
    assert value(samples, "pipeline_messages_out_total", topic=names.non_prime) == others
    assert value(samples, "pipeline_messages_out_total", topic=names.dead) == 1
    assert value(samples, "pipeline_dead_lettered_total") == 1
    assert value(samples, "pipeline_messages_requeued_total") == 0
    assert value(samples, "pipeline_publish_errors_total") == 0
    assert value(samples, "pipeline_in_flight") == 0
    # every produced record carries ts, so each one has an end-to-end latency
    assert value(samples, "pipeline_e2e_latency_seconds_count") == 2000
    assert value(samples, "pipeline_e2e_latency_seconds_bucket", le="+Inf") == 2000
    assert value(samples, "pipeline_batch_size_sum") == 2000  # the bad message never reached the handler
    assert value(samples, "pipeline_handler_seconds_count") == value(samples, "pipeline_batch_size_count") > 0
    assert value(samples, "pipeline_publish_seconds_count") >= value(samples, "pipeline_batches_total") > 0
    assert samples[("process_resident_memory_bytes", ())] > 10e6


def test_a_columnar_batch_is_measured_without_building_its_records():
    import time as _time

    from pipeline.runtime.middleware.metrics import WorkerMetrics
    from pipeline.stage import ColumnBatch, Columns
    metrics = WorkerMetrics("primes", 0, None)
    now = _time.time_ns()
    batch = ColumnBatch(Columns({"id": ["a", "b"], "ts": [now - 2_000_000_000, now - 1_000_000_000]}))
    metrics.before_process_batch(None, batch)
    metrics.after_process_batch(None, batch, result={}, exception=None)
    assert batch._records is None  # the records were never materialised
    counts, total = metrics.e2e.snapshot()
    assert counts[-1][1] == 2 and 2.9 < total < 3.5


@pytest.mark.integration
def test_a_packed_topic_gets_one_e2e_observation_per_record(nsqd, tmp_path, topic):
    # Given one replica reading a topic packed 1,000 records to a message (a typed int64 ts column)
    port = free_port()
    path, names = write_topology(tmp_path, nsqd, topic, replicas=1, metrics_port=port, packs={"input": 1000})
    workers = Workers(path)
    try:
        workers.start(0)
        workers.wait_subscribed(nsqd.http, names.input, 1)
        # When 5,000 numbers go through it in 5 envelopes
        produce_numbers(nsqd.tcp, names.input, 1, 5000, codec="msgpack", pack=1000, run_id="p")
        samples = wait_until(lambda: (s := scrape(port)) and value(s, "pipeline_messages_finished_total") == 5
                             and s, 60, message=f"5 envelopes never finished: {workers.log_tail()}")
    finally:
        workers.stop_all()
    # Then the latency histogram saw each of the 5,000 records once, and none took more than a minute
    assert value(samples, "pipeline_e2e_latency_seconds_count") == 5000
    assert value(samples, "pipeline_e2e_latency_seconds_bucket", le="60.0") == 5000
    assert 0 < value(samples, "pipeline_e2e_latency_seconds_sum") < 5000 * 60


def test_e2e_seconds_of_a_typed_column_skip_missing_stamps_without_a_loop_per_record():
    from pipeline.runtime.middleware.metrics import WorkerMetrics
    from pipeline.stage import ColumnBatch, Columns
    metrics = WorkerMetrics("primes", 0, None)
    now = time.time_ns()
    ts = np.full(1000, now - 2_000_000_000, dtype=np.int64)
    ts[::100] = 0  # a record without a ts (0, as a typed column carries a missing integer)
    batch = ColumnBatch(Columns({"number": np.arange(1000, dtype=np.int64), "ts": ts}))
    metrics.before_process_batch(None, batch)
    metrics.after_process_batch(None, batch, result={}, exception=None)
    counts, total = metrics.e2e.snapshot()
    assert counts[-1][1] == 990 and 990 * 1.9 < total < 990 * 3
    assert batch._records is None  # the records were never built
