"""``pipeline dead redrive`` and ``pipeline dead purge`` on real nsqd (and supervisord for the acceptance)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import CHECK_CHANNEL, collect
from nsqhttp import channel_stats, topic_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.client.nsqclient import NsqSubscriber, publish_records
from pipeline.config import KEEP_CHANNEL, load_topology
from pipeline.ops.control import Supervisor
from pipeline.ops.redrive import RedriveError, purge, redrive
from pipeline.records.codecs import decode, encode_json
from pipeline.records.deadletter import DeadLetter

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def pipeline_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def kept(http: str, topic: str) -> int:
    """Letters in ``topic`` and its keep channel on one nsqd: queued, in flight or deferred."""
    found = channel_stats(http, topic, KEEP_CHANNEL) or {}
    depth = (topic_stats(http, topic) or {}).get("depth", 0)
    return depth + sum(found.get(k, 0) for k in ("depth", "in_flight_count", "deferred_count"))


def letter(stage: str, topic: str, record: dict, reason: str = "ValueError: boom") -> bytes:
    """A dead letter as a worker of ``stage`` writes it, for ``record`` read from ``topic``."""
    return DeadLetter(reason, stage, topic, stage, 3, "0123456789abcdef", encode_json(record)).encode()


# -- on one nsqd, with letters written by hand ----------------------------------------------------------------


@pytest.fixture
def shared(nsqd, tmp_path):
    """Two stages, ``a`` and ``b``, reading one input (so sharing ``orders.dead``), over the test's nsqd."""
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
           "topics": {"orders": {"codec": "json"}, "out": {"codec": "json"}},
           "stages": {"a": {"handler": "m:a", "input": "orders", "channel": "a", "outputs": ["out"]},
                      "b": {"handler": "m:b", "input": "orders", "channel": "b", "outputs": ["out"]}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    nsqd_http.create_channel(nsqd.http, "orders", CHECK_CHANNEL)  # sees what is re-driven
    return load_topology(path)


def test_letters_are_sorted_and_only_matching_ones_of_the_stage_are_re_driven(nsqd, shared):
    # Given a dead-letter topic with no channel: 3 letters of a for "boom", 2 for "bad field",
    # 1 of stage b, 1 from a topic a does not read, 1 that is not a dead letter
    letters = [letter("a", "orders", {"id": f"boom{i}"}) for i in range(3)]
    letters += [letter("a", "orders", {"id": f"field{i}"}, reason="field 'n' must be an integer") for i in range(2)]
    letters += [letter("b", "orders", {"id": "b0"}), letter("a", "elsewhere", {"id": "x0"}), b"junk"]
    publish_records(nsqd.tcp, "orders.dead", letters)
    lines: list[str] = []

    # When a dry run counts them: the keep channel is created and takes the backlog; nothing changes
    counts = redrive(shared, "a", reason="boom", dry_run=True, log=lines.append)
    assert str(counts) == ("would re-drive 3, skipped (reason did not match) 2, other stages' letters 1, "
                           "refused 2, left 8")
    assert channel_stats(nsqd.http, "orders.dead", KEEP_CHANNEL)["depth"] == 8
    assert any("created the durable channel 'keep'" in line and "8 letters moved" in line for line in lines)
    assert any("'elsewhere' is not stage a's input" in line for line in lines)
    assert not (channel_stats(nsqd.http, "orders", CHECK_CHANNEL) or {}).get("depth")

    # Then the real run re-drives the 3 (their original bodies), and a limited one takes 1 more
    counts = redrive(shared, "a", reason="boom", log=lines.append)
    assert (counts.redriven, counts.skipped, counts.left) == (3, 2, 5)
    assert any("b also read orders" in line for line in lines)
    assert redrive(shared, "a", limit=1, log=lines.append).redriven == 1
    with NsqSubscriber(nsqd.tcp, "orders", CHECK_CHANNEL) as sub:
        ids = sorted(decode(m.body)["id"] for m in sub.messages(timeout=0.5))
    assert ids[:3] == ["boom0", "boom1", "boom2"] and len(ids) == 4 and ids[3].startswith("field")
    assert kept(nsqd.http, "orders.dead") == 4

    # And a purge of a on the shared topic removes a's 2 letters left (one refused), not b's or the junk
    assert purge(shared, "a", log=lines.append) == 2
    assert kept(nsqd.http, "orders.dead") == 2
    assert redrive(shared, "b", dry_run=True, log=lines.append).redriven == 1


def test_more_letters_to_leave_than_a_connection_may_hold_are_requeued_and_not_counted_twice(
        nsqd, shared, monkeypatch):
    # Given letters to leave in place beyond what the run may hold in flight (made small here)
    monkeypatch.setattr("pipeline.ops.redrive.MAX_RDY", 12)
    letters = [letter("a", "orders", {"id": f"keep{i}"}, reason="other") for i in range(30)]
    letters[::6] = [letter("a", "orders", {"id": f"boom{i}"}) for i in range(5)]
    publish_records(nsqd.tcp, "orders.dead", letters)
    # When a redrive of the matching ones runs, 5 at a time
    started = time.monotonic()
    counts = redrive(shared, "a", reason="boom", chunk=5, log=lambda line: None)
    # Then it ends soon (the letters it requeued come round again and again), each counted once, all still there
    assert time.monotonic() - started < 15
    assert (counts.redriven, counts.skipped, counts.left) == (5, 25, 25)
    assert channel_stats(nsqd.http, "orders.dead", KEEP_CHANNEL)["depth"] == 25


def test_a_keyed_stage_is_refused_without_force_and_purge_needs_yes(nsqd, tmp_path):
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
           "topics": {"ticks": {"codec": "json", "partitions": 2, "key": "k"}, "out": {"codec": "json"}},
           "stages": {"f": {"handler": "m:f", "input": "ticks", "channel": "f", "outputs": ["out"], "keyed": True,
                            "replicas": 2}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    topology = load_topology(path)
    publish_records(nsqd.tcp, "ticks.dead", [letter("f", "ticks.1", {"id": "t1", "k": "x", "seq": 4})])

    refused = pipeline_cli("dead", "redrive", "f", "-t", str(path))
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "stage f is keyed" in refused.stderr and "--force" in refused.stderr
    with pytest.raises(RedriveError, match="already applied"):
        redrive(topology, "f")
    # --force re-drives to the partition the letter came from
    nsqd_http.create_channel(nsqd.http, "ticks.1", CHECK_CHANNEL)
    assert redrive(topology, "f", force=True, log=lambda line: None).redriven == 1
    assert channel_stats(nsqd.http, "ticks.1", CHECK_CHANNEL)["depth"] == 1

    publish_records(nsqd.tcp, "ticks.dead", [letter("f", "ticks.0", {"id": f"t{i}"}) for i in range(3)])
    unconfirmed = pipeline_cli("dead", "purge", "f", "-t", str(path))
    assert unconfirmed.returncode != 0 and unconfirmed.stderr.count("\n") == 1 and "--yes" in unconfirmed.stderr
    assert kept(nsqd.http, "ticks.dead") == 3
    confirmed = pipeline_cli("dead", "purge", "f", "--yes", "-t", str(path))
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.strip() == "removed 3 dead letters of f"
    assert kept(nsqd.http, "ticks.dead") == 0


# -- the acceptance: a real stage under supervisord ---------------------------------------------------------------

BROKEN = '''
def handle(batch):
    if any(r.get("bad") for r in batch.records):
        raise ValueError("cannot ship a bad order")
    return {"shipped": [{"id": r["id"]} for r in batch.records]}
'''

FIXED = '''
def handle(batch):  # fixed: bad orders ship too
    return {"shipped": [{"id": r["id"], "was_bad": bool(r.get("bad"))} for r in batch.records]}
'''

TOPOLOGY = '''
nsq:
  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]
  lookupd: [{tcp: 127.0.0.1:4160, http: 127.0.0.1:4161}]
topics:
  orders: {codec: json}
  shipped: {codec: json}
stages:
  ship: {handler: "redrive_stage:handle", input: orders, channel: ship, outputs: [shipped], max_tries: 2,
         requeue_delay: 0, msg_timeout: 10, publish_timeout: 5}
'''


def test_dead_letters_are_re_driven_after_the_fix_through_a_killed_redrive_and_none_is_lost(
        running_topology, tmp_path):
    # Given a stage that raises for bad orders, and 200 bad orders dead-lettered among 20 good ones
    (tmp_path / "redrive_stage.py").write_text(BROKEN)
    (tmp_path / "topology.yaml").write_text(TOPOLOGY)
    running = running_topology(tmp_path / "topology.yaml", monitor=False)
    topology, path = running.topology, str(running.topology.path)
    http, tcp = topology.nsqd_http_addresses()[0], topology.nsqd_tcp_addresses()[0]
    nsqd_http.create_channel(http, "orders.dead", KEEP_CHANNEL)  # as `pipeline up` does
    nsqd_http.request(http, "/channel/delete", {"topic": "orders.dead", "channel": "pipeline_testing"})
    nsqd_http.create_channel(http, "shipped", CHECK_CHANNEL)
    running.publish("orders", [{"id": f"o{i}", "bad": i >= 20} for i in range(220)])
    wait_until(lambda: kept(http, "orders.dead") == 200, 60, message="200 dead letters")

    # When a dry run counts them, nothing changes
    dry = pipeline_cli("dead", "redrive", "ship", "--dry-run", "-t", path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "would re-drive 200, skipped (reason did not match) 0, left 200"
    assert kept(http, "orders.dead") == 200 and channel_stats(http, "orders.dead", KEEP_CHANNEL)["depth"] == 200

    # And the stage is fixed and restarted, then during a slow redrive the stage's worker is SIGKILLed
    # (supervisord starts it again) and, about halfway, the redrive itself
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    (tmp_path / "redrive_stage.py").write_text(FIXED)
    restarted = pipeline_cli("restart", "ship", "-t", path)
    assert restarted.returncode == 0, restarted.stderr
    slow = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "dead", "redrive", "ship", "--chunk", "5",
                             "--rate", "100", "-t", path], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: kept(http, "orders.dead") <= 160 or slow.poll() is not None, 30, interval=0.01)
        [worker] = [p for p in Supervisor(topology).processes() if p.group == "ship"]
        os.kill(worker.pid, signal.SIGKILL)  # the stage's worker dies with re-driven orders in hand
        wait_until(lambda: kept(http, "orders.dead") <= 110 or slow.poll() is not None, 30, interval=0.01)
        os.kill(slow.pid, signal.SIGKILL)
    finally:
        slow.wait(10)
    assert slow.returncode == -signal.SIGKILL
    assert 10 < kept(http, "orders.dead") < 190  # killed halfway, with letters in flight to it

    # Then a second run re-drives the rest, waiting for what the killed one held
    started = time.monotonic()
    second = pipeline_cli("dead", "redrive", "ship", "-t", path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().endswith("left 0"), second.stdout
    assert time.monotonic() - started < 30
    # all 220 orders shipped (at least once), 0 lost; the dead-letter topic and its keep channel are empty
    got = collect(tcp, ["shipped"], lambda g: len({r["id"] for r in g["shipped"]}) >= 220, 60)
    assert {r["id"] for r in got["shipped"]} == {f"o{i}" for i in range(220)}
    assert sum(r["was_bad"] for r in got["shipped"] if "was_bad" in r) >= 200
    assert kept(http, "orders.dead") == 0
    assert (topic_stats(http, "orders.dead") or {}).get("depth", 0) == 0


REPLICATED = '''
nsq:
  nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}, {name: n1, tcp: 127.0.0.1:4152, http: 127.0.0.1:4153}]
  lookupd: [{tcp: 127.0.0.1:4160, http: 127.0.0.1:4161}]
topics:
  orders: {codec: json, replication: 2}
  shipped: {codec: json, replication: 2}
stages:
  ship: {handler: "redrive_stage:handle", input: orders, channel: ship, outputs: [shipped], max_tries: 2,
         requeue_delay: 0, msg_timeout: 10, publish_timeout: 5}
'''


def test_a_replicated_stages_letters_are_re_driven_once_each_and_processed_not_taken_for_copies(
        running_topology, tmp_path):
    # Given a replicated stage that raised on 20 bad orders among 20 good ones: each letter on both nodes
    (tmp_path / "redrive_stage.py").write_text(BROKEN)
    (tmp_path / "topology.yaml").write_text(REPLICATED)
    running = running_topology(tmp_path / "topology.yaml", monitor=False)
    topology, path = running.topology, str(running.topology.path)
    https, tcps = topology.nsqd_http_addresses(), topology.nsqd_tcp_addresses()
    for http in https:
        nsqd_http.create_channel(http, "orders.dead", KEEP_CHANNEL)
        nsqd_http.request(http, "/channel/delete", {"topic": "orders.dead", "channel": "pipeline_testing"})
        nsqd_http.create_channel(http, "shipped", CHECK_CHANNEL)
    running.publish("orders", [{"id": f"o{i}", "bad": i >= 20} for i in range(40)])
    def letters() -> bool:  # a late copy of a dead-lettered order is dead-lettered again: 20 or a few more
        idle = all(not channel_stats(h, "orders", "ship") or channel_stats(h, "orders", "ship")["depth"]
                   + channel_stats(h, "orders", "ship")["in_flight_count"]
                   + channel_stats(h, "orders", "ship")["deferred_count"] == 0 for h in https)
        return idle and sum(kept(h, "orders.dead") for h in https) >= 40
    wait_until(letters, 60, message="20 letters, 2 copies each")
    # When the stage is fixed and its letters re-driven (within its window: the bad bodies were seen)
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    (tmp_path / "redrive_stage.py").write_text(FIXED)
    assert pipeline_cli("restart", "ship", "-t", path).returncode == 0
    done = pipeline_cli("dead", "redrive", "ship", "-t", path)
    assert done.returncode == 0 and done.stdout.strip().endswith("left 0"), done.stdout + done.stderr
    # Then every bad order is shipped: the re-driven bodies were processed, not finished as copies
    shipped: dict[str, bool] = {}
    subs = [NsqSubscriber(tcp, "shipped", CHECK_CHANNEL) for tcp in tcps]

    def all_shipped() -> bool:
        for sub in subs:
            for message in sub.messages(timeout=0.05):
                record = decode(message.body)
                shipped[record["id"]] = shipped.get(record["id"], False) or record.get("was_bad", False)
        return sum(shipped.values()) == 20
    try:
        wait_until(all_shipped, 60, message="the 20 re-driven orders shipped")
    finally:
        for sub in subs:
            sub.close()
    assert set(shipped) == {f"o{i}" for i in range(40)}
