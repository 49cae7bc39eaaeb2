"""`pipeline dead ls` and `pipeline dead show` read a real stage's dead letters and remove none; the monitor
bounds what a keep channel holds.

A stage under supervisord dead-letters 200 of 300 records: 100 it rejects, 100
for which its handler raises. The dead-letter topic's keep channel (made by
`pipeline up`) holds them all; `dead ls` counts them with their reasons, `dead
show` prints them with their tracebacks and decoded bodies, and nsqd's /stats
shows the same undelivered count after both. The retention tests run the
monitor's sample on a plain nsqd.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from nsqhttp import wait_until
from pipeline.client import nsqd_http
from pipeline.client.nsqclient import NsqPublisher
from pipeline.config import KEEP_CHANNEL, load_topology
from pipeline.edge.authserver import authorizations
from pipeline.observe.monitor import Monitor
from pipeline.records.codecs import encode_json
from pipeline.records.deadletter import DeadLetter, raw_body
from undelivered import channels, read_back, undelivered

WAIT = 60.0

HANDLER = '''
def check(batch):
    out = []
    for i, record in enumerate(batch.records):
        if record["n"] % 3 == 0:
            batch.reject(i, "a multiple of 3")
        elif record["n"] % 3 == 1:
            raise ValueError("n leaves 1")
        else:
            out.append(record)
    return {"valued": out}
'''

TOPOLOGY = {
    "nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:4150", "http": "127.0.0.1:4151"}]},
    "topics": {"orders": {}, "valued": {}},
    "stages": {"check": {"handler": "checker:check", "input": "orders", "channel": "check", "outputs": ["valued"],
                         "max_tries": 1, "requeue_delay": 0, "batch": {"size": 16, "wait_ms": 5}}},
}


def pipeline(topology: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-t", str(topology)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_dead_ls_and_show_read_a_real_stages_letters_and_take_none(running_topology, tmp_path):
    # Given a stage that dead-letters 200 of 300 records: 100 rejected, 100 it raises for
    project = tmp_path / "project"
    project.mkdir()
    (project / "checker.py").write_text(HANDLER)
    (project / "topology.yaml").write_text(yaml.safe_dump(TOPOLOGY, sort_keys=False))
    running = running_topology(project / "topology.yaml", monitor=False)
    topology, path = running.topology, running.topology.path
    http, tcp = topology.nsqd_http_addresses()[0], topology.nsqd_tcp_addresses()[0]
    running.publish("orders", [{"id": f"o{n}", "n": n} for n in range(300)])
    wait_until(lambda: channels(http, "orders.dead").get(KEEP_CHANNEL) == 200, WAIT,
               message="200 dead letters in orders.dead's keep channel")
    assert running.read("valued", 100, timeout=WAIT)  # the good ones went on
    before = undelivered(http, "orders.dead")

    # When they are listed: one row for the stage, 200 letters, the reasons counted
    listed = pipeline(path, "dead", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["stage"], row["topic"], row["letters"], row["read"], row["complete"]) == \
        ("check", "orders.dead", 200, 200, True)
    reasons = row["reasons"]
    assert reasons.pop("a multiple of 3") == 100
    [(raised, count)] = reasons.items()
    assert count == 100 and "ValueError: n leaves 1" in raised
    assert isinstance(row["oldest_dead_at"], int)
    text = pipeline(path, "dead", "ls")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].split()[:3] == ["check", "orders.dead", "200"]
    assert "     100  a multiple of 3" in text.stdout

    # And shown, filtered by reason: reason, attempts, time, traceback and the decoded body
    shown = pipeline(path, "dead", "show", "check", "-n", "3", "--reason", "VALUEERROR")
    assert shown.returncode == 0, shown.stderr
    blocks = [b for b in shown.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == 3
    for block in blocks:
        assert "  reason:    handler raised ValueError: n leaves 1" in block or "ValueError: n leaves 1" in block
        assert "  attempts:  1" in block and "  dead at:   20" in block and " UTC" in block
        assert "  traceback:" in block and 'raise ValueError("n leaves 1")' in block
        [body] = [line for line in block.splitlines() if line.startswith("  body:")]
        assert json.loads(body.split(":", 1)[1])["n"] % 3 == 1
    as_json = pipeline(path, "dead", "show", "check", "-n", "500", "--json")
    letters = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(letters) == 200 and all(letter["stage"] == "check" for letter in letters)
    none = pipeline(path, "dead", "show", "check", "--reason", "no such reason")
    assert none.returncode == 0 and none.stdout == ""
    assert none.stderr == "no dead letters of check with 'no such reason' in the reason on orders.dead\n"

    # Then nothing was taken: the same count, and every letter read back once from keep
    assert undelivered(http, "orders.dead") == before
    bodies = [json.loads(raw_body(b)) for b in read_back(tcp, "orders.dead", KEEP_CHANNEL, 200)]
    assert sorted(b["n"] for b in bodies) == sorted(n for n in range(300) if n % 3 != 2)


def test_dead_show_of_an_unknown_stage_is_one_line(tmp_path, nsqd):
    path = tmp_path / "topology.yaml"
    doc = {**TOPOLOGY, "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}]}}
    path.write_text(yaml.safe_dump(doc))
    done = pipeline(path, "dead", "show", "nope")
    assert done.returncode == 2
    assert done.stderr == (f"pipeline dead show: Invalid value for STAGE: no stage 'nope' in {path} "
                           "(stages: check)\n")


def test_dead_ls_reads_at_most_its_limit_and_says_so(tmp_path, nsqd):
    from io import StringIO

    from pipeline.observe.deadletters import print_summary, summarize
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({**TOPOLOGY, "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp,
                                                                  "http": nsqd.http}]}}))
    letters = [DeadLetter("boom", "check", "orders", "check", 1, f"{i:016x}", encode_json({"n": i})).encode()
               for i in range(30)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.publish("orders.dead", letters)
    notes: list[str] = []
    [row] = summarize(load_topology(path), limit=10, log=notes.append)
    assert (row.count, row.read, row.complete, dict(row.reasons)) == (30, 10, False, {"boom": 10})
    assert notes == [f"created the durable channel 'keep' on orders.dead (nsqd {nsqd.http}): its 30 queued "
                     "message(s) moved there; nothing was removed"]
    out = StringIO()
    print_summary([row], out)
    assert "(reasons and oldest from the 10 letters read of 30)" in out.getvalue()
    assert undelivered(nsqd.http, "orders.dead") == 30


def test_the_monitor_trims_each_keep_channel_to_its_bound_oldest_first(tmp_path, nsqd, caplog):
    # Given a terminal topic that keeps 40 and a dead-letter topic that keeps 150, each holding more
    doc = {**TOPOLOGY, "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}]}}
    doc["topics"] = {"orders": {}, "valued": {"keep": 40}, "unbounded": {"keep": None}}
    doc["stages"]["check"]["dead_keep"] = 150
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    topology = load_topology(path)
    for topic, n in (("valued", 100), ("orders.dead", 200), ("unbounded", 300), ("orders", 50)):
        nsqd_http.create_channel(nsqd.http, topic, KEEP_CHANNEL if topic != "orders" else "check")
        with NsqPublisher(nsqd.tcp) as pub:
            pub.publish(topic, [encode_json({"i": i}) for i in range(n)])
    # When the monitor takes a sample
    monitor = Monitor(topology, db_path=tmp_path / "health.db")
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.observe.monitor"):
            monitor.sample()
    finally:
        monitor.close()
    # Then each bounded keep channel holds its bound, the newest; the others are untouched
    assert channels(nsqd.http, "valued") == {KEEP_CHANNEL: 40}
    assert channels(nsqd.http, "orders.dead") == {KEEP_CHANNEL: 150}
    assert channels(nsqd.http, "unbounded") == {KEEP_CHANNEL: 300}
    assert channels(nsqd.http, "orders") == {"check": 50}
    assert f"trimmed the 60 oldest message(s) of valued/keep on nsqd {nsqd.tcp}, which keeps 40 at most" \
        in caplog.text
    assert "trimmed the 50 oldest message(s) of orders.dead/keep" in caplog.text
    kept = [json.loads(b)["i"] for b in read_back(nsqd.tcp, "valued", KEEP_CHANNEL, 40)]
    assert sorted(kept) == list(range(60, 100))


def test_the_tail_identity_may_read_keep_and_its_own_channels_only(tmp_path, nsqd):
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({**TOPOLOGY, "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp,
                                                                  "http": nsqd.http}]}}))
    [grant] = authorizations(load_topology(path), "tail")
    assert grant["permissions"] == ["subscribe"]
    assert grant["channels"] == [r"^tail-[0-9a-f]+#ephemeral$", "^keep$"]
