"""A keyed replica's commits: handler calls run ahead, checkpoints and FINs follow in order, failures rewind."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import yaml

from harness import CHECK_CHANNEL, collect
from chaos.market_reference import reference_features
from pipeline.client import nsqd_http
from pipeline.records.envelope import pack
from pipeline.errors import PublishError, TopologyError
from pipeline.runtime.keyed import Checkpoint
from pipeline.client.nsqclient import NsqPublisher
from pipeline.config import load_topology
from pipeline.runtime.worker import Worker
from producers.ticks import produce_ticks, synthetic_ticks

pytestmark = pytest.mark.integration
FLOATS = ("log_return", "ema_fast", "ema_slow", "mean", "std", "zscore", "vwap", "rv")


def features_topology(tmp_path, nsqd, **stage):
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
        "topics": {"ticks": {"codec": "msgpack", "key": "symbol"},
                   "features": {"codec": "msgpack", "key": "symbol", "seq": "feature_seq"}},
        "stages": {"features": {"handler": "consumers.features:Features", "input": "ticks", "channel": "features",
                                "outputs": ["features"], "keyed": True, "max_in_flight": 300,
                                "batch": {"size": 16, "wait_ms": 1}, "params": {"window": 20}, **stage}},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    nsqd_http.create_channel(nsqd.http, "features", CHECK_CHANNEL)
    return load_topology(path)


class InProcessWorker:
    """A Worker on its own event loop in a thread, with hooks to run on that loop after it started."""

    def __init__(self, worker: Worker, after_start):
        self.worker, self.after_start = worker, after_start
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            await self.worker.start()
            self.after_start(self.worker)
            await self.worker._done.wait()
        self.loop.run_until_complete(main())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not drain"


def test_failed_publishes_rewind_a_keyed_replica_to_its_checkpoint_and_state_stays_exact(nsqd, tmp_path):
    topology = features_topology(tmp_path, nsqd)
    ticks = list(synthetic_ticks(4, 3_000, seed=3, run_id="r"))
    reference = reference_features(ticks, window=20)
    produce_ticks(nsqd.tcp, "ticks", ticks, spec=topology.topics["ticks"])  # a backlog: many batches in flight
    calls, failed = [0], []

    def flaky_publisher(worker: Worker) -> None:
        send = worker.publisher.send

        def flaky(outputs, timeout, on_done):
            calls[0] += 1
            if calls[0] in (1, 4, 12):  # nsqd refuses these MPUBs (later batches were already handled)
                failed.append(calls[0])
                asyncio.get_running_loop().call_soon(on_done, PublishError("injected: nsqd refused the MPUB"))
                return
            send(outputs, timeout, on_done)
        worker.publisher.send = flaky

    worker = Worker(topology, "features")
    running = InProcessWorker(worker, flaky_publisher)
    try:
        got = collect(nsqd.tcp, ["features"],
                      lambda g: len({(f["symbol"], f["seq"]) for f in g["features"]}) >= len(ticks), 90)
    finally:
        running.stop()

    # a failed publish of a batch that an earlier failure's rewind requeued already is not counted again
    assert failed == [1, 4, 12] and 1 <= worker.stats["publish_errors"] <= 3
    assert worker.stats["requeued"] > 3 * 16, "every batch after a failed one is requeued, not only that one"
    assert worker.stats["gaps"] == 0
    by_key = {}
    for f in got["features"]:  # a rewound batch published again: the copies must be identical
        first = by_key.setdefault((f["symbol"], f["seq"]), f)
        assert all(first[name] == f[name] for name in FLOATS)
    assert set(by_key) == set(reference)
    for key, expected in reference.items():
        assert all(math.isclose(by_key[key][n], expected[n], rel_tol=1e-9, abs_tol=1e-9) for n in FLOATS), key
    saved, _ = Checkpoint(topology.var_dir / "state" / "features-0.ckpt").load()
    last = {}
    for t in ticks:
        last[t["symbol"]] = t["seq"]
    assert saved["applied"] == last  # the last checkpoint holds every tick once


def test_a_long_checkpoint_interval_gives_way_when_half_the_in_flight_window_waits(nsqd, tmp_path):
    # An interval far longer than the test: only the half-window rule can take the checkpoints that
    # let the messages be finished, and each takes about max_in_flight / 2 of them.
    topology = features_topology(tmp_path, nsqd, checkpoint_interval_ms=20_000, msg_timeout=60, max_in_flight=100)
    ticks = list(synthetic_ticks(4, 1_000, seed=5, run_id="w"))
    worker = Worker(topology, "features")
    running = InProcessWorker(worker, lambda w: None)
    try:
        produce_ticks(nsqd.tcp, "ticks", ticks, spec=topology.topics["ticks"])
        got = collect(nsqd.tcp, ["features"], lambda g: len(g["features"]) >= len(ticks), 30)
        assert len(got["features"]) == len(ticks)
        deadline = time.monotonic() + 30
        while worker.stats["finished"] < 950 and time.monotonic() < deadline:  # the last 50 may wait
            time.sleep(0.05)
        assert worker.stats["finished"] >= 950
    finally:
        running.stop()  # draining takes the last checkpoint at once
    assert worker.stats["finished"] == len(ticks)
    assert 1_000 / 100 <= worker.stats["checkpoints"] <= 1_000 / 50 + 2


def test_an_atomic_columnar_stage_that_fails_halfway_rewinds_to_its_checkpoint_and_stays_exact(nsqd, tmp_path):
    # Given a stage that takes no snapshot before its columnar calls (columns_atomic) but raises halfway
    # through the envelope holding v == 13, after adding the records before it
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
           "topics": {"ins": {"codec": "msgpack", "key": "key", "pack": 5}, "sums": {"codec": "msgpack"}},
           "stages": {"s": {"handler": "stages_for_tests:AtomicColumnarRunningSum", "input": "ins", "channel": "c",
                            "outputs": ["sums"], "keyed": True, "max_tries": 2, "batch": {"size": 4, "wait_ms": 1}}}}
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    topology = load_topology(tmp_path / "topology.yaml")
    nsqd_http.create_channel(nsqd.http, "sums", CHECK_CHANNEL)
    nsqd_http.create_channel(nsqd.http, "ins.dead", CHECK_CHANNEL)
    records = [{"id": f"r{seq}", "key": "A", "seq": seq, "v": 13 if seq == 17 else 2 * seq}
               for seq in range(1, 41)]
    with NsqPublisher(nsqd.tcp) as publisher:
        publisher.publish("ins", pack(records, 5))
    worker = Worker(topology, "s")
    running = InProcessWorker(worker, lambda w: None)
    try:
        # When the replica runs them: the failing call rewinds it, and the batch comes back (to the columnar
        # path again while it is in order and within max_tries, else to the record path)
        got = collect(nsqd.tcp, ["sums", "ins.dead"],
                      lambda g: len({r["seq"] for r in g["sums"]}) >= 39 and g["ins.dead"], 30)
    finally:
        running.stop()
    # Then every other record was applied once, in order, and 13 alone was dead-lettered
    expected, total = {}, 0
    for record in records:
        if record["v"] != 13:
            total += record["v"]
            expected[record["seq"]] = total
    assert {r["seq"]: r["sum"] for r in got["sums"]} == expected
    assert [d["reason"] for d in got["ins.dead"]] == ["handler raised ValueError: unlucky 13 (keyed stages do not retry)"]
    assert 'stages_for_tests.py", line' in got["ins.dead"][0]["traceback"]
    assert worker.stats["requeued"] >= 4, "the failing batch was requeued by a rewind"


def test_checkpoint_interval_must_stay_under_half_the_message_timeout(nsqd, tmp_path):
    with pytest.raises(TopologyError, match=r":\d+:\d+: stages\.features\.checkpoint_interval_ms: checkpoint_interval_ms"
                                            r" 10000 must be under half of msg_timeout \(20 s\)"):
        features_topology(tmp_path, nsqd, checkpoint_interval_ms=10_000, msg_timeout=20)
