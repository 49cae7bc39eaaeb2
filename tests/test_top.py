"""`pipeline top`: the table built from real nsqd stats and a real replica's metrics."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.console import Console

from harness import ROOT, Workers, collect, ids_seen, write_topology
from nsqhttp import channel_stats, http_pub, wait_until
from pipeline.client import nsqd_http
from pipeline.ops.processes import free_port
from pipeline.observe.top import build_rows, render, snapshot
from pipeline.config import load_topology
from producers.numbers import produce_numbers

pytestmark = pytest.mark.integration


def test_top_rows_show_rates_depth_and_dead_letters_of_a_running_stage(nsqd, tmp_path, topic):
    # Given one replica with metrics, and 50 messages parked in a channel nobody reads
    path, names = write_topology(tmp_path, nsqd, topic, replicas=1, metrics_port=free_port())
    topology = load_topology(path)
    workers = Workers(path)
    try:
        workers.start(0)
        workers.wait_subscribed(nsqd.http, names.input, 1)
        nsqd_http.create_channel(nsqd.http, names.prime, "idle")
        produce_numbers(nsqd.tcp, names.prime, 1, 50, run_id="p")
        before = snapshot(topology)
        # When 1,000 numbers and one bad message go through between two snapshots
        produce_numbers(nsqd.tcp, names.input, 1, 1000, run_id="t")
        assert http_pub(nsqd.http, names.input, b"[1, 2") == (200, "OK")
        collect(nsqd.tcp, names.outputs,
                lambda g: len(set(ids_seen(g, [names.prime, names.non_prime]))) >= 1000 and g[names.dead], 60)
        wait_until(lambda: (channel_stats(nsqd.http, names.input, "primes") or {}).get("in_flight_count") == 0, 10)
        after = snapshot(topology)
        text = subprocess.run([sys.executable, "-m", "pipeline.cli", "top", "--once", "--interval", "0.2",
                               "-t", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        workers.stop_all()
    dt = after.ts - before.ts
    rows = {(r.topic, r.channel): r for r in build_rows(topology, before, after)}
    # Then the stage's row has its rates over the interval, its dead letter and a latency
    stage = rows[(names.input, "primes")]
    assert (stage.stage, stage.replicas, stage.depth, stage.in_flight) == ("primes", "1/1", 0, 0)
    assert round(stage.rate_in * dt) == 1001
    assert round(stage.rate_out * dt) == 1000
    assert stage.dead_letters == 1 and stage.restarts == 0
    assert stage.p99_s is not None
    # and a channel no stage reads shows the depth nsqd reports
    idle = rows[(names.prime, "idle")]
    assert idle.stage == "-" and idle.depth == channel_stats(nsqd.http, names.prime, "idle")["depth"] >= 50
    printed = Console(width=200, record=True)
    printed.print(render(list(rows.values())))
    assert f"{names.input}/primes" in printed.export_text()
    assert text.returncode == 0, text.stderr
    assert f"{names.input}/primes" in text.stdout and "p99" in text.stdout
