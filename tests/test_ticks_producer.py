"""Keyed partitions (pipeline.records.partition) and the ticks producer (producers.ticks), on a real nsqd."""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from nsqhttp import topic_stats

from pipeline.client import nsqd_http
from pipeline.client import producer as producer_module
from pipeline.client import spread as spread_module
from pipeline.client.nsqclient import NsqPublisher, NsqSubscriber
from pipeline.config import TopicSpec, Topology, load_topology
from pipeline.errors import PublishError
from pipeline.records.codecs import decode
from pipeline.records.envelope import is_envelope, records_of
from pipeline.records.partition import PartitionKeyError, Router, partition_of, partition_topics, route
from producers.ticks import ReplayError, parse_speed, produce_ticks, replay_ticks, symbol_names, synthetic_ticks

CHANNEL = "check"
SYMBOLS = [f"SYM00{i}" for i in range(6)]


def write_topology(tmp_path: Path, topics: dict, tcp: str = "127.0.0.1:4150",
                   http: str = "127.0.0.1:4151") -> Topology:
    """Write a topology with ``topics`` over one nsqd and load it."""
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": tcp, "http": http}], "var_dir": str(tmp_path / "var")},
           "topics": topics}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ticks.csv"
    path.write_text(text)
    return path


def market(ticks: list[dict]) -> list[tuple]:
    """What a seed determines: everything but ts and the run id."""
    return [(t["symbol"], t["seq"], t["price"], t["size"]) for t in ticks]


# --- partition_of -----------------------------------------------------------------------------------

def test_partition_of_gives_the_same_known_values_everywhere():
    # Computed once and frozen: a change here moves keyed state to other partitions.
    assert [partition_of(s, 4) for s in SYMBOLS] == [3, 1, 3, 1, 2, 0]
    assert {k: partition_of(k, 7) for k in ("AAPL", "MSFT", "GOOG", "user-1")} == \
        {"AAPL": 5, "MSFT": 3, "GOOG": 2, "user-1": 5}
    assert partition_of("ÄÖ", 16) == 4
    # CRC-32's published check value, 0xCBF43926 for "123456789": any language can reproduce the hash.
    assert partition_of("123456789", 64) == 0xCBF43926 % 64


@pytest.mark.parametrize("partitions", [1, 3, 4, 7, 16])
def test_partition_of_is_in_range_and_roughly_uniform(partitions):
    counts = Counter(partition_of(f"key-{i}", partitions) for i in range(1000))
    assert set(counts) == set(range(partitions))
    expected = 1000 / partitions
    assert all(abs(n - expected) < 0.3 * expected for n in counts.values()), counts


def test_partition_of_hashes_an_int_key_as_its_decimal_text():
    assert partition_of(12345, 7) == partition_of("12345", 7) == 1


def test_partition_of_rejects_other_keys_and_bad_partition_counts():
    with pytest.raises(TypeError, match="must be a str or an int, not bool"):
        partition_of(True, 4)
    with pytest.raises(TypeError, match="not float"):
        partition_of(1.5, 4)
    with pytest.raises(ValueError, match="partitions must be >= 1, not 0"):
        partition_of("a", 0)


# --- routing ----------------------------------------------------------------------------------------

def test_route_groups_records_by_partition_keeping_their_order(tmp_path):
    topology = write_topology(tmp_path, {"ticks": {"partitions": 4, "key": "symbol"}, "plain": {}})
    records = [{"symbol": s, "n": i} for i, s in enumerate(SYMBOLS * 2)]
    groups = route(records, "ticks", topology)
    assert list(groups) == ["ticks.0", "ticks.1", "ticks.2", "ticks.3"]
    assert [r["n"] for r in groups["ticks.1"]] == [1, 3, 7, 9]  # SYM001, SYM003, twice each, in order
    assert sum(len(g) for g in groups.values()) == len(records)
    assert route(records, "plain", topology) == {"plain": records}
    assert route([], "ticks", topology) == {}


def test_route_rows_puts_each_row_where_route_puts_its_record(tmp_path):
    topology = write_topology(tmp_path, {"ticks": {"partitions": 4, "key": "symbol"}, "plain": {}})
    keys = [*SYMBOLS, 17, *SYMBOLS[:3]]
    router = Router.of(topology, "ticks")
    rows = router.route_rows(keys)
    assert {t: [keys[i] for i in r] for t, r in rows.items()} == \
        {t: [rec["symbol"] for rec in recs] for t, recs in router.route([{"symbol": k} for k in keys]).items()}
    assert Router.of(topology, "plain").route_rows(keys) == {"plain": list(range(len(keys)))}
    for bad in (None, 1.5, True, ["SYM000"]):  # the record path names the bad key
        assert router.route_rows([*SYMBOLS, bad]) is None


def test_router_from_a_spec_names_topics_as_the_topology_does(tmp_path):
    topology = write_topology(tmp_path, {"ticks": {"partitions": 5, "key": "symbol"}, "plain": {}})
    for name in ("ticks", "plain"):
        assert partition_topics(name, topology.topics[name].partitions) == topology.physical_topics(name)
        assert Router.for_spec(name, topology.topics[name]) == Router.of(topology, name)


def test_a_record_without_its_key_is_an_error_carrying_the_record():
    router = Router.for_spec("ticks", TopicSpec(partitions=4, key="symbol"))
    bad = {"id": "r-7", "price": 1.0}
    with pytest.raises(PartitionKeyError, match=r"record has no 'symbol' field to pick a partition of 'ticks'"
                                                r": \{'id': 'r-7'") as caught:
        router.route([{"symbol": "SYM000"}, bad])
    assert caught.value.record is bad and caught.value.key == "symbol" and caught.value.topic == "ticks"
    with pytest.raises(PartitionKeyError, match="must be a str or an int, not list"):
        router.topic_of({"symbol": ["SYM000"]})


def test_an_unpartitioned_topic_needs_no_key_but_a_partitioned_one_does():
    assert Router.for_spec("plain", TopicSpec()).topic_of({"no": "key"}) == "plain"
    with pytest.raises(ValueError, match="topic 'ticks' has 2 partitions but no key field"):
        Router("ticks", ("ticks.0", "ticks.1"), None)


# --- synthetic ticks --------------------------------------------------------------------------------

def test_synthetic_ticks_number_each_symbol_from_1_without_gaps():
    ticks = list(synthetic_ticks(6, 2000, seed=3, run_id="r"))
    assert len(ticks) == 2000
    seqs = defaultdict(list)
    for t in ticks:
        seqs[t["symbol"]].append(t["seq"])
        assert t["id"] == f"r-{t['symbol']}-{t['seq']}"
        assert type(t["price"]) is float and t["price"] > 0
        assert type(t["size"]) is int and 1 <= t["size"] <= 1000
    assert sorted(seqs) == SYMBOLS
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())
    assert [t["symbol"] for t in ticks[:6]] != SYMBOLS  # interleaved at random, not round-robin


def test_synthetic_ticks_are_determined_by_the_seed():
    first = list(synthetic_ticks(6, 500, seed=11))
    assert market(first) == market(synthetic_ticks(6, 500, seed=11))
    assert market(first) != market(synthetic_ticks(6, 500, seed=12))
    # the first n ticks do not depend on how many are asked for (draws come in fixed blocks)
    assert market(synthetic_ticks(6, 5000, seed=11))[:500] == market(first)


def test_synthetic_prices_follow_the_drift():
    # Given a strong drift and no volatility, When 10 ticks of one symbol are made, Then price grows by exp(mu dt)
    ticks = list(synthetic_ticks(1, 10, mu=2.0, sigma=0.0, dt=0.01, start_price=50.0))
    assert ticks[-1]["price"] == pytest.approx(50.0 * math.exp(2.0 * 0.01 * 10))


@pytest.mark.parametrize("kwargs, message", [
    ({"symbols": 0}, "symbols must be >= 1, not 0"),
    ({"count": -1}, "count must be >= 0, not -1"),
    ({"start_price": 0.0}, "start_price must be > 0, not 0.0"),
    ({"sigma": -0.1}, "sigma must be >= 0, not -0.1"),
    ({"dt": 0}, "dt must be > 0, not 0"),
])
def test_synthetic_ticks_reject_bad_parameters(kwargs, message):
    args = {"symbols": 2, "count": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        next(synthetic_ticks(args.pop("symbols"), args.pop("count"), **args))


def test_symbol_names_widen_past_a_thousand():
    assert symbol_names(2) == ["SYM000", "SYM001"]
    assert symbol_names(1500)[-1] == "SYM1499" and symbol_names(1500)[0] == "SYM0000"


# --- replay -----------------------------------------------------------------------------------------

def test_replay_numbers_each_symbol_in_file_order(tmp_path):
    path = write_csv(tmp_path, "symbol,ts,price,size\n"  # any column order
                               "AAA,1000,10.5,3\nBBB,2000,20.0,4\n\nAAA,3000,10.6,5\nBBB,4000,19.5,6\n"
                               "AAA,5000,10.7,7\n")
    ticks = list(replay_ticks(path, run_id="r"))
    assert [(t["symbol"], t["seq"]) for t in ticks] == [("AAA", 1), ("BBB", 1), ("AAA", 2), ("BBB", 2), ("AAA", 3)]
    assert ticks[2] == {"id": "r-AAA-2", "ts": 3000, "symbol": "AAA", "seq": 2, "price": 10.6, "size": 5}


@pytest.mark.parametrize("row, reason", [
    ("AAA,4000,10.0", "expected 4 fields, got 3"),
    ("AAA,4000,10.0,5,extra", "expected 4 fields, got 5"),
    ("AAA,4.5e3,10.0,5", "ts '4.5e3' is not an integer"),
    ("AAA,4000,ten,5", "price 'ten' is not a number"),
    ("AAA,4000,10.0,5.0", "size '5.0' is not an integer"),
])
def test_a_malformed_row_is_an_error_naming_its_line(tmp_path, row, reason):
    # Given a bad row on line 5 (after a blank line), When replayed, Then the rows before it come out first
    path = write_csv(tmp_path, f"symbol,ts,price,size\nAAA,1000,10.5,3\nBBB,2000,20.0,4\n\n{row}\nAAA,9000,1.0,1\n")
    ticks = replay_ticks(path)
    assert [next(ticks)["ts"], next(ticks)["ts"]] == [1000, 2000]
    with pytest.raises(ReplayError) as caught:
        next(ticks)
    assert str(caught.value) == f"{path}:5: {reason}"
    assert caught.value.line == 5 and caught.value.row == row.split(",")


def test_a_row_that_is_not_csv_or_not_utf8_is_an_error_naming_its_line(tmp_path):
    path = write_csv(tmp_path, 'ts,symbol,price,size\n1,AAA,1.0,1\n2,"BBB"x,2.0,2\n3,AAA,1.0,1\n')
    with pytest.raises(ReplayError, match=r"ticks\.csv:3: not CSV: ',' expected after '\"'$"):
        list(replay_ticks(path))
    path.write_bytes(b"ts,symbol,price,size\n1,AAA,1.0,1\n2,\xff\xfe,2.0,2\n")
    with pytest.raises(ReplayError, match=r"ticks\.csv:3: not UTF-8 text: "):
        list(replay_ticks(path))


def test_spaces_around_fields_are_ignored(tmp_path):
    path = tmp_path / "ticks.csv"  # as a spreadsheet saves it: byte-order mark, CRLF, padded fields
    path.write_bytes("\ufeff ts , symbol ,price,size\r\n1000, AAA , 10.5 , 3\r\n".encode())
    assert market(replay_ticks(path)) == [("AAA", 1, 10.5, 3)]


@pytest.mark.parametrize("text, reason", [
    ("", "empty file; expected the header ts,symbol,price,size"),
    ("ts,symbol,price\n1,A,1.0\n", "header must name the columns ts,symbol,price,size, got ts,symbol,price"),
    ("ts,symbol,price,volume\n", "header must name the columns ts,symbol,price,size, got ts,symbol,price,volume"),
])
def test_a_bad_header_is_an_error_on_line_1(tmp_path, text, reason):
    path = write_csv(tmp_path, text)
    with pytest.raises(ReplayError, match="^" + str(path) + ":1: " + reason.replace(".", r"\.") + "$"):
        list(replay_ticks(path))


def test_implausible_but_well_typed_ticks_pass_through_for_the_pipeline_to_dead_letter(tmp_path):
    path = write_csv(tmp_path, "ts,symbol,price,size\n5000,AAA,-1.0,0\n1000,,nan,-3\n")
    ticks = list(replay_ticks(path))
    assert [(t["ts"], t["symbol"], t["price"], t["size"]) for t in ticks][0] == (5000, "AAA", -1.0, 0)
    assert ticks[1]["symbol"] == "" and math.isnan(ticks[1]["price"]) and ticks[1]["size"] == -3


# --- pacing options ---------------------------------------------------------------------------------

def test_parse_speed():
    assert parse_speed("max") is None and parse_speed("MAX") is None
    assert parse_speed("2.5") == 2.5 and parse_speed(1) == 1.0
    for bad in ("0", "-1", "fast", "nan", "inf", 0):
        with pytest.raises(ValueError, match="speed must be 'max' or a number above 0"):
            parse_speed(bad)


def test_rate_and_speed_together_are_refused_before_connecting():
    with pytest.raises(ValueError, match="pace by rate .* or by speed, not both"):
        produce_ticks("127.0.0.1:1", "t", [], rate=10, speed=1.0)


# --- on a real nsqd ---------------------------------------------------------------------------------

def prepare(nsqd, topology: Topology, topic: str) -> list[str]:
    """Create the physical topics of ``topic`` with a check channel, before anything is published."""
    physical = topology.physical_topics(topic)
    for name in physical:
        nsqd_http.create_channel(nsqd.http, name, CHANNEL)
    return physical


def read_back(nsqd, topics: list[str]) -> dict[str, list[dict]]:
    """Read every message nsqd accepted on each of ``topics`` (decoded bodies, envelopes not unpacked)."""
    expected = {name: nsqd_http.topic_message_count(nsqd.http, name) for name in topics}
    # All subscribed first: nsqd holds output up to 250 ms per client, so this waits once, not per topic.
    subs = {name: NsqSubscriber(nsqd.tcp, name, CHANNEL) for name in topics if expected[name]}
    bodies: dict[str, list[dict]] = {name: [] for name in topics}
    try:
        for name, sub in subs.items():
            for message in sub.messages(timeout=5.0):
                bodies[name].append(decode(message.body))
                if len(bodies[name]) == expected[name]:
                    break
    finally:
        for sub in subs.values():
            sub.close()
    assert {n: len(b) for n, b in bodies.items()} == expected
    return bodies


@pytest.mark.integration
@pytest.mark.parametrize("pack, codec", [(1, "msgpack"), (50, "json")])
def test_ticks_land_on_their_symbols_partition_in_order(nsqd, topic, tmp_path, pack, codec):
    topology = write_topology(tmp_path, {topic: {"partitions": 4, "key": "symbol", "pack": pack, "codec": codec}},
                              nsqd.tcp, nsqd.http)
    physical = prepare(nsqd, topology, topic)
    progress: list[int] = []

    acked = produce_ticks(nsqd.tcp, topic, synthetic_ticks(6, 2000, seed=5), spec=topology.topics[topic],
                          chunk=16, on_progress=progress.append)

    assert acked == 2000 and progress[-1] == 2000 and progress == sorted(progress)
    bodies = read_back(nsqd, physical)
    assert topic_stats(nsqd.http, topic) is None  # nothing went to the logical name itself
    per_symbol = defaultdict(list)
    for k, name in enumerate(physical):
        assert all(is_envelope(b) == (pack > 1) for b in bodies[name])
        if pack > 1:  # a buffer holds chunk * pack records, so only a partition's last envelope is short
            assert all(len(list(records_of([b]))) == 50 for b in bodies[name][:-1])
        for tick in records_of(bodies[name]):
            assert partition_of(tick["symbol"], 4) == k, f"{tick} landed on {name}"
            per_symbol[tick["symbol"]].append(tick["seq"])
    assert sum(len(s) for s in per_symbol.values()) == 2000
    assert sorted(per_symbol) == SYMBOLS
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_symbol.values())


@pytest.mark.integration
def test_an_unpartitioned_topic_gets_every_tick_at_the_given_rate(nsqd, topic):
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    started = time.monotonic()
    acked = produce_ticks(nsqd.tcp, topic, synthetic_ticks(3, 300, seed=1), rate=1500)
    elapsed = time.monotonic() - started
    assert acked == 300
    assert elapsed >= 299 / 1500 * 0.95, elapsed  # the last tick was due 299/1500 s after the first
    ticks = read_back(nsqd, [topic])[topic]
    assert market(ticks) == market(synthetic_ticks(3, 300, seed=1))


@pytest.mark.integration
def test_replay_at_a_speed_keeps_the_original_spacing_scaled(nsqd, topic, tmp_path):
    # Given ticks 100 ms apart over 0.4 s, When replayed at speed 2, Then publishing takes about 0.2 s
    rows = "".join(f"{1_000_000_000 + i * 100_000_000},SYM00{i % 2},{10 + i},{i + 1}\n" for i in range(5))
    path = write_csv(tmp_path, "ts,symbol,price,size\n" + rows)
    spec = TopicSpec(partitions=2, key="symbol")
    for name in partition_topics(topic, 2):
        nsqd_http.create_channel(nsqd.http, name, CHANNEL)
    started = time.monotonic()
    assert produce_ticks(nsqd.tcp, topic, replay_ticks(path), spec=spec, speed="2") == 5
    assert 0.19 <= time.monotonic() - started < 3.0
    bodies = read_back(nsqd, partition_topics(topic, 2))
    replayed = sorted((t["ts"], t["symbol"], t["seq"]) for ts in bodies.values() for t in ts)
    assert replayed == [(1_000_000_000 + i * 100_000_000, f"SYM00{i % 2}", i // 2 + 1) for i in range(5)]


@pytest.mark.integration
def test_a_long_pause_reconnects_without_losing_or_reordering(nsqd, topic, tmp_path, monkeypatch):
    # regression guard: nsqd drops a client silent for 60 s, so a paced replay reconnects after a pause
    monkeypatch.setattr(producer_module, "_IDLE_RECONNECT", 0.0)  # every MPUB counts as after a long pause
    connections = []

    closed = []

    class CountingPublisher(NsqPublisher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            connections.append(self)

        def close(self):
            closed.append(self)
            super().close()

    monkeypatch.setattr(spread_module, "NsqPublisher", CountingPublisher)  # the producer's connections
    spec = TopicSpec(partitions=2, key="symbol", pack=3)
    for name in partition_topics(topic, 2):
        nsqd_http.create_channel(nsqd.http, name, CHANNEL)
    progress: list[int] = []
    assert produce_ticks(nsqd.tcp, topic, synthetic_ticks(4, 400, seed=2), spec=spec, chunk=5,
                         on_progress=progress.append) == 400
    assert progress[-1] == 400 and progress == sorted(progress)
    assert len(connections) > 10 and set(closed) == set(connections)
    bodies = read_back(nsqd, partition_topics(topic, 2))
    per_symbol = defaultdict(list)
    for name in bodies:
        for tick in records_of(bodies[name]):
            per_symbol[tick["symbol"]].append(tick["seq"])
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_symbol.values())
    assert sum(len(s) for s in per_symbol.values()) == 400


@pytest.mark.integration
def test_a_bad_replay_line_stops_after_publishing_every_tick_before_it(nsqd, topic, tmp_path):
    path = write_csv(tmp_path, "ts,symbol,price,size\n1,AAA,1.0,1\n2,BBB,2.0,2\n3,AAA,3.0,3\n4,AAA,oops,4\n")
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    with pytest.raises(ReplayError, match=r":5: price 'oops' is not a number$"):
        produce_ticks(nsqd.tcp, topic, replay_ticks(path))
    assert [t["ts"] for t in read_back(nsqd, [topic])[topic]] == [1, 2, 3]


@pytest.mark.integration
def test_a_refused_publish_raises_publish_error(nsqd):
    with pytest.raises(PublishError, match="refused a publish: E_BAD_TOPIC"):
        produce_ticks(nsqd.tcp, "bad*topic", synthetic_ticks(1, 10))


def test_linger_must_be_positive_and_at_most_a_second():
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match=r"linger_ms must be in \(0, 1000\]"):
            produce_ticks("127.0.0.1:1", "t", [], rate=10, linger_ms=bad)


def test_the_cli_refuses_a_bad_linger_in_one_line():
    from click.testing import CliRunner

    from pipeline.cli import main
    result = CliRunner().invoke(main, ["produce", "ticks", "--count", "5", "--linger-ms", "0"])
    assert result.exit_code == 2 and "--linger-ms" in result.output


@pytest.mark.integration
def test_a_shorter_linger_sends_smaller_envelopes_sooner(nsqd, topic, tmp_path):
    # At 2,000 ticks/s a 50 ms linger gathers about 100 ticks per send, a 2 ms one a few: also when the
    # producer falls behind its rate (a busy machine) and so never sleeps.
    envelopes = {}
    for linger in (50.0, 2.0):
        name = f"{topic}{int(linger)}"
        (tmp_path / name).mkdir()
        topology = write_topology(tmp_path / name, {name: {"pack": 1000, "codec": "msgpack"}}, nsqd.tcp, nsqd.http)
        nsqd_http.create_channel(nsqd.http, name, CHANNEL)
        assert produce_ticks(nsqd.tcp, name, synthetic_ticks(3, 400, seed=2), spec=topology.topics[name],
                             rate=2000, linger_ms=linger) == 400
        bodies = read_back(nsqd, [name])[name]
        assert sum(len(list(records_of([b]))) for b in bodies) == 400
        envelopes[linger] = len(bodies)
    assert envelopes[2.0] > 3 * envelopes[50.0], envelopes


@pytest.mark.integration
def test_a_producer_behind_its_rate_still_sends_within_its_linger(nsqd, topic, tmp_path):
    # At a million ticks/s every tick is overdue, so the producer never sleeps; the linger still bounds
    # how long a tick sits in its buffer, instead of the buffer waiting to fill (5,000 ticks, one envelope).
    topology = write_topology(tmp_path, {topic: {"pack": 5000, "codec": "msgpack"}}, nsqd.tcp, nsqd.http)
    nsqd_http.create_channel(nsqd.http, topic, CHANNEL)
    assert produce_ticks(nsqd.tcp, topic, synthetic_ticks(3, 5000, seed=4), spec=topology.topics[topic],
                         rate=1_000_000, linger_ms=1) == 5000
    bodies = read_back(nsqd, [topic])[topic]
    assert sum(len(list(records_of([b]))) for b in bodies) == 5000
    assert len(bodies) >= 3, len(bodies)
