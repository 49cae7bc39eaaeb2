"""pipeline.Producer and `pipeline produce TOPIC --from FILE`: any declared topic, every record once, seq that lasts."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from nsqhttp import wait_until
from test_ticks_producer import prepare, read_back, write_topology

from pipeline import Producer
from pipeline.client import nsqd_http
from pipeline.client.position import PositionError
from pipeline.records.envelope import records_of
from pipeline.records.sources import FileSource

TOPICS = {
    "json": {"codec": "json"},
    "msgpack": {"codec": "msgpack"},
    "packed": {"codec": "json", "pack": 100},
    "keyed": {"partitions": 4, "key": "account"},
}


def orders(count: int, start: int = 0) -> list[dict]:
    return [{"order": i, "account": f"acct{i % 7}", "qty": i % 5 + 1} for i in range(start, start + count)]


def write_jsonl(path: Path, records: list[dict], bad: dict[int, str] | None = None) -> Path:
    """Write ``records`` one per line; ``bad`` puts a raw text on a line (1-based) instead."""
    lines = [json.dumps(r) for r in records]
    for line, text in sorted((bad or {}).items()):
        lines.insert(line - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def published(nsqd, topology, topic: str) -> list[dict]:
    """Every record nsqd holds on ``topic``'s physical topics, envelopes unpacked."""
    out = []
    for bodies in read_back(nsqd, topology.physical_topics(topic)).values():
        out += records_of(bodies)
    return out


def produce_cli(topology_path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "produce", *args, "-t", str(topology_path)],
                          capture_output=True, text=True, timeout=120, **kwargs)


def seqs_by_key(records: list[dict]) -> dict[str, list[int]]:
    seqs = defaultdict(list)
    for r in records:
        seqs[r["account"]].append(r["seq"])
    return {k: sorted(v) for k, v in seqs.items()}


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(TOPICS))
def test_produce_from_a_file_reaches_every_kind_of_topic_once(nsqd, tmp_path, kind):
    topology = write_topology(tmp_path, {"orders": TOPICS[kind]}, nsqd.tcp, nsqd.http)
    prepare(nsqd, topology, "orders")
    source = write_jsonl(tmp_path / "orders.jsonl", orders(2000))
    done = produce_cli(topology.path, "orders", "--from", str(source))
    assert done.returncode == 0, done.stderr
    assert "read 2000 lines; published 2000 records to orders, 2000 acknowledged; refused 0" in done.stdout
    got = published(nsqd, topology, "orders")
    assert sorted((r["order"], r["account"], r["qty"]) for r in got) == [
        (r["order"], r["account"], r["qty"]) for r in orders(2000)]
    assert len({r["id"] for r in got}) == 2000 and all(type(r["ts"]) is int for r in got)
    if kind == "keyed":  # numbered per key in file order, from 1, without gaps
        expected: dict[str, list[int]] = defaultdict(list)
        for r in orders(2000):
            expected[r["account"]].append(len(expected[r["account"]]) + 1)
        assert seqs_by_key(got) == expected
        assert all(r["seq"] == sorted(x["seq"] for x in got if x["account"] == r["account"]).index(r["seq"]) + 1
                   for r in got[:50])


@pytest.mark.integration
def test_a_malformed_line_is_reported_as_file_line_reason(nsqd, tmp_path):
    topology = write_topology(tmp_path, {"orders": TOPICS["keyed"]}, nsqd.tcp, nsqd.http)
    prepare(nsqd, topology, "orders")
    source = write_jsonl(tmp_path / "orders.jsonl", orders(10), bad={4: '{"order": 3,', 8: '{"qty": 1}'})
    failed = produce_cli(topology.path, "orders", "--from", str(source))
    assert failed.returncode == 1
    assert f"{source}:4: not JSON:" in failed.stderr
    assert "read 4 lines; published 3 records to orders, 3 acknowledged; refused 1" in failed.stderr
    skipped = produce_cli(topology.path, "orders", "--from", str(source), "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert f"{source}:8: record has no 'account' field to pick a partition of 'orders'" in skipped.stderr
    # the failed run stopped before line 4 with lines 1-3 acknowledged: the second run resumes there
    assert f"resuming {source} after line 3" in skipped.stderr
    assert "read 9 lines; published 7 records to orders, 7 acknowledged; refused 2" in skipped.stdout
    assert sorted(r["order"] for r in published(nsqd, topology, "orders")) == list(range(10))


@pytest.mark.integration
def test_a_second_run_continues_each_keys_seq_and_a_rerun_of_a_finished_file_is_new(nsqd, tmp_path):
    topology = write_topology(tmp_path, {"orders": TOPICS["keyed"]}, nsqd.tcp, nsqd.http)
    prepare(nsqd, topology, "orders")
    with Producer(topology, "orders") as producer:
        producer.send(orders(100))
    with Producer(topology.path, "orders") as producer:  # another run, from the file
        for record in orders(100, start=100):
            producer.send(record)
        assert producer.flush() == 100
    got = published(nsqd, topology, "orders")
    per_key = seqs_by_key(got)
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_key.values())
    first_run = {(r["account"], r["seq"]) for r in got if r["order"] < 100}
    assert all(seq <= 15 for _, seq in first_run) and max(r["seq"] for r in got) >= 28
    position = json.loads((tmp_path / "var" / "producers" / "orders.json").read_text())
    assert position["seq"] == {k: len(v) for k, v in per_key.items()}


def test_two_producers_of_one_keyed_topic_on_one_machine_are_refused(tmp_path):
    topology = write_topology(tmp_path, {"orders": TOPICS["keyed"], "plain": {}})
    with Producer(topology, "orders"):
        with pytest.raises(PositionError, match="another producer is publishing to this topic"):
            Producer(topology, "orders")
        with Producer(topology, "plain"), Producer(topology, "plain"):
            pass  # an unkeyed topic numbers nothing: two at once is fine
    Producer(topology, "orders").close()  # released


def test_an_undeclared_topic_is_one_line_naming_the_declared_ones(tmp_path):
    topology = write_topology(tmp_path, {"orders": {}})
    done = produce_cli(topology.path, "ordrs", "--from", "-", input="")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (f"pipeline: topic 'ordrs' is not declared in {topology.path} "
                                                    "(declared: orders)")


@pytest.mark.integration
def test_a_producer_killed_halfway_resumes_and_each_key_seq_has_one_record(nsqd, tmp_path):
    topology = write_topology(tmp_path, {"orders": TOPICS["keyed"]}, nsqd.tcp, nsqd.http)
    physical = prepare(nsqd, topology, "orders")
    records = orders(6000)
    source = write_jsonl(tmp_path / "orders.jsonl", records)
    argv = [sys.executable, "-m", "pipeline.cli", "produce", "orders", "--from", str(source), "--rate", "2000",
            "-t", str(topology.path)]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sum(nsqd_http.topic_message_count(nsqd.http, t) for t in physical) >= 3000, 30,
                   message="the first run never published half the file")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    sent_before = sum(nsqd_http.topic_message_count(nsqd.http, t) for t in physical)
    assert sent_before < 6000
    again = produce_cli(topology.path, "orders", "--from", str(source))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    got = published(nsqd, topology, "orders")
    by_key_seq: dict[tuple, set] = defaultdict(set)
    for r in got:
        by_key_seq[(r["account"], r["seq"])].add((r["order"], r["qty"]))
    # what a run without the kill gives: each account's orders numbered 1.. in file order
    expected, counts = {}, defaultdict(int)
    for r in records:
        counts[r["account"]] += 1
        expected[(r["account"], counts[r["account"]])] = {(r["order"], r["qty"])}
    assert by_key_seq == expected  # a record sent twice carries the same (key, seq): a keyed stage drops it
    assert len(got) - 6000 < 4000 + 500  # resumed, not started over: only the unsaved second's records twice


def test_file_source_reads_csv_values_and_reports_lines(tmp_path):
    path = tmp_path / "o.csv"
    path.write_text('account,qty,price,code,note\nA,3,2.5,007,"two\nlines"\nB,x\n\nC,,-1e3,12,\n')
    source = FileSource(str(path))
    lines = list(source)
    assert [(ln.number, ln.record, ln.error) for ln in lines] == [
        (2, {"account": "A", "qty": 3, "price": 2.5, "code": "007", "note": "two\nlines"}, None),
        (4, None, "expected 5 fields (account,qty,price,code,note), got 2"),
        (6, {"account": "C", "qty": None, "price": -1000.0, "code": 12, "note": None}, None),
    ]
    mark = source.mark()
    assert mark is not None and mark.line == 6 and mark.offset == path.stat().st_size


def ticks_file(path: Path, ticks: list[dict]) -> Path:
    """The ticks as JSON lines, without the seq the producer assigns."""
    return write_jsonl(path, [{k: v for k, v in t.items() if k not in ("seq", "id")} for t in ticks])


def numbered(ticks: list[dict]) -> list[dict]:
    """``ticks`` with each symbol's seq from 1 in order, as one uninterrupted producer run numbers them."""
    counts: dict[str, int] = defaultdict(int)
    out = []
    for t in ticks:
        counts[t["symbol"]] += 1
        out.append({**t, "seq": counts[t["symbol"]]})
    return out


def assert_features_equal_the_uninterrupted_run(got: list[dict], ticks: list[dict]) -> None:
    from chaos.market_reference import reference_features
    from test_keyed_worker import FLOATS

    reference = reference_features(numbered(ticks), window=20)
    by_key: dict[tuple, dict] = {}
    for f in got:
        first = by_key.setdefault((f["symbol"], f["seq"]), f)
        assert all(first[n] == f[n] for n in FLOATS)  # a redelivered tick's features are identical
    assert set(by_key) == set(reference)
    for key, expected in reference.items():
        assert all(math.isclose(by_key[key][n], expected[n], rel_tol=1e-9, abs_tol=1e-9) for n in FLOATS), key


@pytest.fixture
def features_worker(nsqd, tmp_path):
    """A keyed features replica, in-process, on a one-partition ticks topic; yields the topology."""
    from test_keyed_worker import InProcessWorker, features_topology

    from pipeline.runtime.worker import Worker

    topology = features_topology(tmp_path, nsqd)
    running = InProcessWorker(Worker(topology, "features"), lambda w: None)
    try:
        yield topology
    finally:
        running.stop()


@pytest.mark.integration
def test_two_producer_runs_into_a_keyed_topic_are_both_applied_by_the_keyed_stage(nsqd, tmp_path, features_worker):
    from harness import collect
    from producers.ticks import synthetic_ticks

    ticks = list(synthetic_ticks(4, 1_600, seed=11))
    first, second = ticks_file(tmp_path / "monday.jsonl", ticks[:800]), ticks_file(tmp_path / "tuesday.jsonl", ticks[800:])
    for source in (first, second):
        done = produce_cli(features_worker.path, "ticks", "--from", str(source))
        assert done.returncode == 0, done.stderr
    got = collect(nsqd.tcp, ["features"], lambda g: len({(f["symbol"], f["seq"]) for f in g["features"]}) >= 1_600,
                  60)
    assert_features_equal_the_uninterrupted_run(got["features"], ticks)


@pytest.mark.integration
def test_a_producer_killed_halfway_gives_the_keyed_stage_the_uninterrupted_outputs(nsqd, tmp_path, features_worker):
    from harness import collect
    from producers.ticks import synthetic_ticks

    ticks = list(synthetic_ticks(4, 4_000, seed=12))
    source = ticks_file(tmp_path / "ticks.jsonl", ticks)
    argv = [sys.executable, "-m", "pipeline.cli", "produce", "ticks", "--from", str(source), "--rate", "1500",
            "-t", str(features_worker.path)]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: nsqd_http.topic_message_count(nsqd.http, "ticks") >= 2_000, 30,
                   message="the first run never published half the file")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    again = produce_cli(features_worker.path, "ticks", "--from", str(source))
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr
    got = collect(nsqd.tcp, ["features"], lambda g: len({(f["symbol"], f["seq"]) for f in g["features"]}) >= 4_000,
                  60)
    assert_features_equal_the_uninterrupted_run(got["features"], ticks)


def test_a_generator_name_with_from_is_the_topic_of_that_name(tmp_path):
    topology = write_topology(tmp_path, {"numbers": {}})
    done = produce_cli(topology.path, "numbers", "--from", "-", input="")  # nothing to send: no nsqd needed
    assert done.returncode == 0, done.stderr
    assert "<stdin>: read 0 lines; published 0 records to numbers, 0 acknowledged; refused 0" in done.stdout
    generator = produce_cli(topology.path, "numbers", "--help")
    assert "--count" in generator.stdout and "--from" not in generator.stdout


@pytest.mark.integration
def test_a_record_nsqd_cannot_take_is_its_lines_reason_not_a_failed_mpub(nsqd, tmp_path):
    topology = write_topology(tmp_path, {"orders": {}}, nsqd.tcp, nsqd.http)
    prepare(nsqd, topology, "orders")
    source = tmp_path / "orders.csv"  # CSV: an integer of any size reads as one
    source.write_text("order,qty,note\n0,1,a\n9,1180591620717411303424,b\n1,2,c\n4,1," + "x" * (1 << 20) + "\n2,3,d\n")
    failed = produce_cli(topology.path, "orders", "--from", str(source))
    assert failed.returncode == 1
    assert f"{source}:3: cannot be encoded as json: Integer exceeds 64-bit range" in failed.stderr
    skipped = produce_cli(topology.path, "orders", "--from", str(source), "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert re.search(f"{source}:5: 1,048,6[0-9]{{2}} bytes encoded, more than nsqd takes in a message "
                     r"\(1,048,576\)", skipped.stderr), skipped.stderr
    assert "published 2 records to orders, 2 acknowledged; refused 2" in skipped.stdout  # resumed after line 2
    assert sorted(r["order"] for r in published(nsqd, topology, "orders")) == [0, 1, 2]
