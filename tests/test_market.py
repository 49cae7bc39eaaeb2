"""ticks -> features -> signals on real nsqd, with 4 partitions, against the offline reference."""
from __future__ import annotations

import math
import os
import random
import threading

import pytest
import yaml

from harness import CHECK_CHANNEL, Workers, collect
from chaos.market_reference import reference_features, reference_signals
from nsqhttp import channel_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.config import load_topology
from producers.ticks import produce_ticks, replay_ticks, synthetic_ticks

pytestmark = pytest.mark.integration
PARTITIONS = 4
KILL_TICKS = int(os.environ.get("NSQ_PIPELINE_KILL_TICKS", 50_000))
# The replay runs at a rate the 8 keyed workers sustain on 2 cores while being killed: a crashed
# replica's messages come back only behind the queue, so a deep backlog would outlast the gap wait.
REPLAY_RATE = int(os.environ.get("NSQ_PIPELINE_KILL_RATE", 2_000))
FLOATS = ("price", "size", "log_return", "ema_fast", "ema_slow", "mean", "std", "zscore", "vwap", "rv")


def market(tmp_path, nsqd, partitions=PARTITIONS, **stage):
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
        "topics": {"ticks": {"codec": "msgpack", "partitions": partitions, "key": "symbol"},
                   "features": {"codec": "msgpack", "partitions": partitions, "key": "symbol",
                                "seq": "feature_seq"},
                   "signals": {"codec": "json"}},
        "stages": {
            "features": {"handler": "consumers.features:Features", "input": "ticks", "channel": "features",
                         "outputs": ["features"], "keyed": True, "replicas": partitions,
                         "batch": {"size": 64, "wait_ms": 2}, "params": {"window": 20}, **stage},
            "signals": {"handler": "consumers.signals:Signals", "input": "features", "channel": "signals",
                        "outputs": ["signals"], "keyed": True, "replicas": partitions,
                        "batch": {"size": 64, "wait_ms": 2}, **stage},
        },
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    topology = load_topology(path)
    outputs = [*topology.physical_topics("features"), "signals", "ticks.dead", "features.dead"]
    for topic in outputs:
        nsqd_http.create_channel(nsqd.http, topic, CHECK_CHANNEL)
    return topology, outputs


def start_market(topology, nsqd, workers: list) -> None:
    for stage in ("features", "signals"):
        w = Workers(topology.path, stage=stage)
        workers.append(w)
        w.replicas = [w.start(k) for k in range(PARTITIONS)]
    for stage, source in (("features", "ticks"), ("signals", "features")):
        for topic in topology.physical_topics(source):
            wait_until(lambda: len((channel_stats(nsqd.http, topic, stage) or {}).get("clients") or []) == 1, 60,
                       message=f"{stage} never subscribed to {topic}")


@pytest.fixture
def workers():
    running: list[Workers] = []
    yield running
    for w in running:
        w.stop_all()


def split(got, outputs):
    features = [r for t in outputs if t.startswith("features.") and not t.endswith("dead") for r in got.get(t, [])]
    return features, got.get("signals", []), got.get("ticks.dead", []) + got.get("features.dead", [])


def assert_features_equal(features, reference):
    by_key = {(f["symbol"], f["seq"]): f for f in features}
    assert set(by_key) == set(reference)
    for key, expected in reference.items():
        got = by_key[key]
        for name in FLOATS:
            assert math.isclose(got[name], expected[name], rel_tol=1e-9, abs_tol=1e-9), (key, name)


def assert_signals_equal(signals, reference):
    def key(s):
        return s["id"], s["rule"], s["signal"]
    assert sorted(map(key, signals)) == sorted(map(key, reference))
    strength = {s["id"]: s["strength"] for s in reference}
    assert all(math.isclose(s["strength"], strength[s["id"]], rel_tol=1e-9, abs_tol=1e-9) for s in signals)


def test_features_and_signals_equal_the_reference_with_4_partitions(nsqd, tmp_path, workers):
    topology, outputs = market(tmp_path, nsqd)
    ticks = list(synthetic_ticks(8, 6_000, seed=7, run_id="m"))
    reference = reference_features(ticks, window=20)
    expected_signals = reference_signals(sorted(reference.values(), key=lambda f: (f["symbol"], f["seq"])))
    start_market(topology, nsqd, workers)

    produce_ticks(nsqd.tcp, "ticks", ticks, spec=topology.topics["ticks"])
    got = collect(nsqd.tcp, outputs, lambda g: len(split(g, outputs)[0]) >= len(ticks)
                  and len(split(g, outputs)[1]) >= len(expected_signals), 120)

    features, signals, dead = split(got, outputs)
    assert not dead
    assert_features_equal(features, reference)
    assert_signals_equal(signals, expected_signals)


def test_duplicated_and_swapped_ticks_do_not_change_the_features(nsqd, tmp_path, workers):
    topology, outputs = market(tmp_path, nsqd)
    ticks = list(synthetic_ticks(4, 2_000, seed=11, run_id="d"))
    reference = reference_features(ticks, window=20)
    # Given the same ticks with some sent twice and some neighbours of one symbol swapped
    rng = random.Random(5)
    sent = list(ticks)
    for i in rng.sample(range(len(ticks)), 100):
        sent.insert(rng.randrange(i, len(sent)), ticks[i])
    for _ in range(50):
        i = rng.randrange(len(sent) - 1)
        if sent[i]["symbol"] == sent[i + 1]["symbol"]:
            sent[i], sent[i + 1] = sent[i + 1], sent[i]
    start_market(topology, nsqd, workers)

    produce_ticks(nsqd.tcp, "ticks", sent, spec=topology.topics["ticks"])
    got = collect(nsqd.tcp, outputs, lambda g: len({(f["symbol"], f["seq"]) for f in split(g, outputs)[0]})
                  >= len(ticks), 120)
    features, _, dead = split(got, outputs)
    assert not dead
    assert len(features) == len(ticks), "a duplicate tick must not produce a second feature"
    assert_features_equal(features, reference)


def test_bad_ticks_are_dead_lettered_and_leave_the_symbol_state_alone(nsqd, tmp_path, workers):
    topology, outputs = market(tmp_path, nsqd)
    ticks = list(synthetic_ticks(3, 600, seed=3, run_id="b"))
    reference = reference_features(ticks, window=20)
    victim = ticks[300]["symbol"]
    seq = max(t["seq"] for t in ticks if t["symbol"] == victim) + 1
    bad = [dict(ticks[0], id="bad-price", symbol=victim, seq=seq, price=-1.0),
           dict(ticks[0], id="bad-nan", symbol=victim, seq=seq + 1, price=float("nan")),
           dict(ticks[0], id="bad-size", symbol=victim, seq=seq + 2, size="lots")]
    start_market(topology, nsqd, workers)

    produce_ticks(nsqd.tcp, "ticks", ticks + bad, spec=topology.topics["ticks"])
    got = collect(nsqd.tcp, outputs, lambda g: len(split(g, outputs)[0]) >= len(ticks)
                  and len(split(g, outputs)[2]) >= 3, 60)
    features, _, dead = split(got, outputs)
    assert_features_equal(features, reference)  # the state of the victim ignores its bad ticks
    reasons = {d["reason"] for d in dead}
    assert any("'price'" in r for r in reasons) and any("'size'" in r for r in reasons)


def test_state_stays_exact_while_replicas_are_sigkilled_during_a_replay(nsqd, tmp_path, workers):
    # Given a tick CSV replayed at a steady rate into 4 partitions
    topology, outputs = market(tmp_path, nsqd, msg_timeout=3, publish_timeout=1)
    ticks = list(synthetic_ticks(16, KILL_TICKS, seed=21, run_id="k"))
    csv = tmp_path / "ticks.csv"
    csv.write_text("ts,symbol,price,size\n" + "".join(
        f"{t['ts']},{t['symbol']},{t['price']!r},{t['size']}\n" for t in ticks))
    replayed = list(replay_ticks(csv, run_id="k"))
    reference = reference_features(replayed, window=20)
    expected_signals = reference_signals(sorted(reference.values(), key=lambda f: (f["symbol"], f["seq"])))
    start_market(topology, nsqd, workers)
    producer = threading.Thread(target=produce_ticks, args=(nsqd.tcp, "ticks", replayed), daemon=True,
                                kwargs={"spec": topology.topics["ticks"], "rate": REPLAY_RATE})

    # When, during the replay, a random feature or signal replica is SIGKILLed every 1-3 s (seeded)
    # and started again at once (as supervisord does)
    kills = Killer(workers, seed=4)
    producer.start()
    kills.start()
    try:
        producer.join(KILL_TICKS / REPLAY_RATE * 3)
    finally:
        kills.stop()
    assert not producer.is_alive(), "the replay did not finish"
    got = collect(nsqd.tcp, outputs, lambda g: len({f["id"] for f in split(g, outputs)[0]}) >= len(ticks)
                  and len({s["id"] for s in split(g, outputs)[1]}) >= len(expected_signals), 300)

    # Then, after de-duplicating by id, the outputs equal the reference
    features, signals, dead = split(got, outputs)
    assert not dead
    unique_features = list({f["id"]: f for f in features}.values())
    unique_signals = list({s["id"]: s for s in signals}.values())
    print(f"\n{kills.count} SIGKILLs; duplicates: {len(features) - len(unique_features)} features, "
          f"{len(signals) - len(unique_signals)} signals")
    assert kills.count >= 3
    assert_features_equal(unique_features, reference)
    assert_signals_equal(unique_signals, expected_signals)


class Killer:
    """SIGKILLs a random replica every 1-3 s and starts it again, as supervisord would."""

    def __init__(self, workers: list, seed: int):
        self.workers, self.rng = workers, random.Random(seed)
        self.count, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(1.0, 3.0)):
            w = self.rng.choice(self.workers)
            replica = self.rng.randrange(PARTITIONS)
            proc = w.replicas[replica]
            proc.kill()
            proc.wait(10)
            w.replicas[replica] = w.start(replica)
            self.count += 1
