"""The monitor: NSQ stats as Prometheus metrics, samples in health.db, retention."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nsqhttp import channel_stats, topic_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.observe.healthdb import HealthDB
from pipeline.observe.monitor import Monitor
from pipeline.client.nsqclient import NsqPublisher
from pipeline.ops.processes import free_port
from pipeline.config import load_topology

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write_topology(tmp_path, nsqd, lookupd=None, **sections):
    nsq = {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")}
    if lookupd is not None:
        nsq["lookupd"] = [{"tcp": lookupd.tcp, "http": lookupd.http}]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"nsq": nsq, **sections}, sort_keys=False))
    return load_topology(path)


def scrape(port: int) -> dict:
    text = _LOCAL.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.integration
def test_monitor_metrics_show_the_depth_nsqd_reports(nsq_cluster, tmp_path, topic):
    # Given 37 messages waiting in a channel nobody reads, on an nsqd found through the lookupd
    nsqd = nsq_cluster.nsqd
    nsqd_http.create_channel(nsqd.http, topic, "idle")
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(topic, [b'{"n": %d}' % i for i in range(37)])
    monitor = Monitor(write_topology(tmp_path, nsqd, nsq_cluster.lookupd))
    try:
        port = monitor.serve("127.0.0.1:0")
        # When Prometheus scrapes the monitor
        samples = scrape(port)
        monitor.sample()
        rows = [r for r in monitor.db.channels(0) if r.topic == topic]
    finally:
        monitor.close()
    # Then depth and counts equal nsqd's own /stats
    channel, whole = channel_stats(nsqd.http, topic, "idle"), topic_stats(nsqd.http, topic)
    assert channel["depth"] == 37
    labels = (("channel", "idle"), ("nsqd", "n0"), ("topic", topic))
    assert samples[("nsq_channel_depth", labels)] == channel["depth"]
    assert samples[("nsq_channel_message_count_total", labels)] == channel["message_count"] == 37
    assert samples[("nsq_channel_in_flight", labels)] == 0
    assert samples[("nsq_channel_clients", labels)] == 0
    assert samples[("nsq_topic_message_count_total", (("nsqd", "n0"), ("topic", topic)))] == whole["message_count"]
    assert samples[("nsqd_up", (("nsqd", "n0"),))] == 1
    # and the sample in health.db holds the same figures
    assert {(r.channel, r.depth, r.messages) for r in rows} == {("", 0, 37), ("idle", 37, 37)}


def test_health_db_drops_rows_past_retention(tmp_path):
    db = HealthDB(tmp_path / "health.db", retention_days=1)
    day = 86400.0
    rows = [(t, "n0", "topic", "ch", 1, 0, 0, 0, 0, 0, 1, 0, None) for t in range(0, 3 * 86400, 60)]
    db.insert("channel", rows)
    db.insert("host", [(10.0, 1.0, 1, 2, 3), (2.5 * day, 1.0, 1, 2, 3)])
    db.prune(now=3 * day)
    kept = db.channels(0)
    assert kept and min(r.ts for r in kept) >= 2 * day  # older than one day: gone
    assert [h[0] for h in db.host(0)] == [2.5 * day]
    db.close()


def test_a_health_db_from_before_start_times_gains_them_and_keeps_its_rows(tmp_path):
    # Given a health.db written before the worker and nsqd tables had a start-time column
    import sqlite3
    old = sqlite3.connect(tmp_path / "health.db")
    old.executescript("""
        CREATE TABLE worker (ts REAL, stage TEXT, replica INTEGER, up INTEGER, messages_in REAL, finished REAL,
                             requeued REAL, dead_lettered REAL, publish_errors REAL, e2e_buckets TEXT);
        CREATE TABLE nsqd (ts REAL, nsqd TEXT, http TEXT, health TEXT);
        INSERT INTO worker VALUES (1.0, 'primes', 0, 1, 5, 5, 0, 0, 0, '[]');
        INSERT INTO nsqd VALUES (1.0, 'n0', '127.0.0.1:2', 'OK');""")
    old.commit()
    old.close()
    # When the monitor opens it and samples as it does now
    db = HealthDB(tmp_path / "health.db")
    db.insert("worker", [(2.0, "primes", 0, 1, 9, 9, 0, 0, 0, "[]", 1234.5)])
    db.insert("nsqd", [(2.0, "n0", "127.0.0.1:2", "OK", 1000)])
    # Then the old rows read back without a start time, the new ones with theirs
    assert [(w.finished, w.started) for w in db.workers(0)] == [(5, None), (9, 1234.5)]
    assert [r[4] for r in db.nsqd_health(0)] == [None, 1000]
    db.close()


def test_health_db_size_bound_drops_the_oldest_first(tmp_path):
    db = HealthDB(tmp_path / "health.db", retention_days=3650, max_bytes=100_000)
    db.insert("channel", [(float(t), "n0", "topic", "ch" * 20, 1, 0, 0, 0, 0, 0, 1, 0, None) for t in range(20000)])
    assert db.size_bytes() > 100_000
    db.prune(now=20000.0)
    kept = [r.ts for r in db.channels(0)]
    assert db.size_bytes() <= 100_000
    assert kept and max(kept) == 19999.0 and min(kept) > 0
    db.close()


def run_cli(*args, env=None, **kwargs):
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.integration
def test_pipeline_monitor_serves_samples_and_stops_cleanly_on_sigterm(nsqd, tmp_path, topic):
    # Given a topology whose monitor listens on a free port
    port = free_port()
    nsqd_http.create_channel(nsqd.http, topic, "idle")
    topology = write_topology(tmp_path, nsqd, monitor={"interval": 0.1, "listen": f"127.0.0.1:{port}"})
    proc = run_cli("monitor", "-t", str(topology.path))
    try:
        # When it has run for a few samples
        samples = wait_until(lambda: _scrape_or_none(port), 30, message="monitor never served /metrics")
        wait_until(lambda: (_scrape_or_none(port) or {}).get(("pipeline_monitor_samples_total", ()), 0) >= 3, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    # Then it served NSQ metrics, wrote health.db, and exited 0 on SIGTERM
    assert proc.returncode == 0, err
    assert samples[("nsq_channel_depth", (("channel", "idle"), ("nsqd", "n0"), ("topic", topic)))] == 0
    assert HealthDB(tmp_path / "var" / "health.db").sample_count("nsqd") >= 3


def _scrape_or_none(port):
    try:
        return scrape(port)
    except OSError:
        return None


def test_pipeline_monitor_refuses_to_start_without_the_smtp_password(tmp_path):
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:1", "http": "127.0.0.1:2"}]},
           "report": {"to": ["ops@example.com"], "from": "np@example.com",
                      "smtp": {"host": "127.0.0.1", "user": "np", "password_env": "NP_TEST_UNSET_PASSWORD"}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("monitor", "-t", str(path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().endswith("report.smtp.password_env: environment variable NP_TEST_UNSET_PASSWORD "
                                "(the SMTP password) is not set")
    assert not (tmp_path / "var").exists()  # nothing started
