"""ticks -> features -> signals on real nsqd, with 4 partitions, against the offline reference."""
from __future__ import annotations

import math
import random

import pytest
import yaml

from harness import CHECK_CHANNEL, Workers, collect
from market_reference import reference_features, reference_signals
from nsqhttp import channel_stats, wait_until
from pipeline import nsqd_http
from pipeline.topology import load_topology
from producers.ticks import produce_ticks, synthetic_ticks

pytestmark = pytest.mark.integration
PARTITIONS = 4
FLOATS = ("price", "size", "log_return", "ema_fast", "ema_slow", "mean", "std", "zscore", "vwap", "rv")


def market(tmp_path, nsqd, partitions=PARTITIONS):
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
        "topics": {"ticks": {"codec": "msgpack", "partitions": partitions, "key": "symbol"},
                   "features": {"codec": "msgpack", "partitions": partitions, "key": "symbol"},
                   "signals": {"codec": "json"}},
        "stages": {
            "features": {"handler": "consumers.features:Features", "input": "ticks", "channel": "features",
                         "outputs": ["features"], "keyed": True, "replicas": partitions,
                         "batch": {"size": 64, "wait_ms": 2}, "params": {"window": 20}},
            "signals": {"handler": "consumers.signals:Signals", "input": "features", "channel": "signals",
                        "outputs": ["signals"], "keyed": True, "replicas": partitions,
                        "batch": {"size": 64, "wait_ms": 2}},
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
        for k in range(PARTITIONS):
            w.start(k)
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
