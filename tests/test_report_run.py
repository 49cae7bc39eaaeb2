"""The health report over a real run: ticks through 4 keyed replicas under supervisord, sampled by the monitor."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from nsqhttp import channel_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.config import load_topology
from pipeline.observe.healthdb import HealthDB
from pipeline.observe.report_charts import depth_series, draw, throughput_series
from pipeline.ops.control import Supervisor
from pipeline.ops.processes import consecutive_free_ports, free_port, pid_alive, stop_pid
from producers.ticks import produce_ticks, synthetic_ticks
from test_metrics import scrape
from test_report import assert_readable

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
TICKS, REPLICAS, ORPHANS = 20_000, 4, 300


def pipeline(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def market(nsq_bin):
    """The features stage (4 keyed replicas, metrics on), not yet up, and no monitor yet."""
    folder = Path(tempfile.mkdtemp(prefix="np-"))  # short: supervisord's unix socket lives in it
    port = lambda: f"127.0.0.1:{free_port()}"  # noqa: E731
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": port(), "http": port()}], "lookupd": [{"tcp": port(), "http": port()}],
                "var_dir": "var"},
        "topics": {"ticks": {"codec": "msgpack", "partitions": REPLICAS, "key": "symbol"},
                   "features": {"codec": "msgpack", "partitions": REPLICAS, "key": "symbol", "seq": "feature_seq"}},
        "stages": {"features": {"handler": "consumers.features:Features", "input": "ticks", "channel": "features",
                                "outputs": ["features"], "keyed": True, "replicas": REPLICAS,
                                "metrics_port": consecutive_free_ports(REPLICAS), "batch": {"size": 256, "wait_ms": 5},
                                "params": {"ema_fast": 12, "ema_slow": 26, "window": 50}}},
    }
    path = folder / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    topology = load_topology(path)
    yield topology
    supervisor = Supervisor(topology)
    pids = [p.pid for p in supervisor.processes() if p.pid] if supervisor.running() else []
    pidfile = topology.var_dir / "run" / "supervisord.pid"
    pids += [int(pidfile.read_text())] if pidfile.exists() else []
    if supervisor.running():
        pipeline("down", "-t", str(path))
    for pid in pids:
        if pid_alive(pid):
            stop_pid(pid, grace=10)
    shutil.rmtree(folder, ignore_errors=True)


def finished_by_replica(topology) -> list[int]:
    """Each replica's own ``pipeline_messages_finished_total``, scraped now."""
    spec = topology.stages["features"]
    return [int(scrape(spec.metrics_port + k).get(
        ("pipeline_messages_finished_total", (("replica", str(k)), ("stage", "features"))), 0))
        for k in range(REPLICAS)]


def sampled(db: HealthDB, counts: list[int]) -> bool:
    """Whether the monitor's latest sample of every replica shows ``counts``."""
    latest = {w.replica: w.finished for w in db.workers(0) if w.up}
    return [latest.get(k) for k in range(REPLICAS)] == counts


def table(text: str, title: str) -> list[list[str]]:
    """The rows of the table ``title`` in a report's text, split on blanks."""
    lines = text.split(f"\n{title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split() for line in lines[2:]]  # after the header and its rule


def test_report_of_20000_ticks_through_4_replicas_says_20000_despite_a_late_monitor_and_a_restart(market, tmp_path):
    topology, tcp, http = market, market.nsqd_tcp_addresses()[0], market.nsqd_http_addresses()[0]
    ticks = list(synthetic_ticks(symbols=32, count=TICKS, seed=19, run_id="r"))
    result = pipeline("up", "-t", str(topology.path))
    assert result.returncode == 0, result.stderr
    supervisor, started = Supervisor(topology), time.time()
    workers = {p.name: p.pid for p in supervisor.processes() if p.group == "features"}
    # Given the first half went through before the pipeline had a monitor
    produce_ticks(tcp, "ticks", ticks[:TICKS // 2], spec=topology.topics["ticks"])
    wait_until(lambda: sum(finished_by_replica(topology)) == TICKS // 2, 60, message="first half not finished")
    before_kill = finished_by_replica(topology)
    # and a monitor sampling every 0.3 s is added to the running pipeline (its workers are left running)
    doc = yaml.safe_load(topology.path.read_text())
    topology.path.write_text(yaml.safe_dump({**doc, "monitor": {"interval": 0.3}}, sort_keys=False))
    result = pipeline("up", "-t", str(topology.path))
    assert result.returncode == 0, result.stderr
    assert {p.name: p.pid for p in supervisor.processes() if p.group == "features"} == workers
    db = HealthDB(topology.var_dir / "health.db")
    wait_until(lambda: sampled(db, before_kill), 30, message="the monitor never sampled the first half")
    # When one replica is SIGKILLed (supervisord starts it again) and the second half goes through
    victim = {p.name: p.pid for p in supervisor.processes()}["features-1"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any(p.name == "features-1" and p.pid not in (0, victim) and p.state == "RUNNING"
                           for p in supervisor.processes())
               and len((channel_stats(http, "ticks.1", "features") or {}).get("clients") or []) == 1, 60,
               message="features-1 not back")
    wait_until(lambda: sampled(db, [before_kill[0], 0, *before_kill[2:]]), 30, message="restart never sampled")
    produce_ticks(tcp, "ticks", ticks[TICKS // 2:], spec=topology.topics["ticks"])
    # and a topic nobody reads holds a backlog
    nsqd_http.request(http, "/mpub", {"topic": "orphan"}, body=b"\n".join(b'{"n": %d}' % i for i in range(ORPHANS)))
    wait_until(lambda: before_kill[1] + sum(finished_by_replica(topology)) == TICKS, 60,
               message="second half not finished")
    after = finished_by_replica(topology)
    wait_until(lambda: sampled(db, after), 30, message="the monitor never sampled the end")
    wait_until(lambda: any(c.topic == "orphan" and c.depth == ORPHANS for c in db.channels(0)), 30,
               message="the orphan topic never sampled")
    out = tmp_path / "out"
    report = pipeline("report", "--since", f"{time.time() - started + 60:.0f}s", "--out", str(out),
                      "-t", str(topology.path))

    # Then the stage's total is the sum of the replicas' counters, the killed one's two lives included
    assert before_kill[1] + sum(after) == TICKS and min(before_kill) > 0
    [stage] = table(report.stdout, "Stages")
    assert stage[:3] == ["features", str(REPLICAS), f"{TICKS:,}"], report.stdout
    # and so do the topics' and channels' counts from nsqd, which started inside the window
    queues = {(row[0], row[1]): int(row[5].replace(",", "")) for row in table(report.stdout, "Topics and channels")}
    assert sum(n for (topic, channel), n in queues.items() if channel == "features") == TICKS
    assert sum(n for (topic, channel), n in queues.items() if topic.startswith("features.") and channel == "(topic)") \
        == TICKS  # each terminal partition's keep channel (pipeline up) holds the same messages again
    assert sum(n for (topic, channel), n in queues.items() if topic.startswith("features.") and channel == "keep") \
        == TICKS
    assert queues[("orphan", "(topic)")] == ORPHANS  # published between two samples
    # and --out wrote the text (the one printed), the HTML, the email and one PNG per chart
    assert sorted(p.name for p in out.iterdir()) == ["depth.png", "report.eml", "report.html", "report.txt",
                                                     "throughput.png"]
    assert (out / "report.txt").read_text() == report.stdout
    for png in ("depth.png", "throughput.png"):
        assert matplotlib.image.imread(io.BytesIO((out / png).read_bytes()), format="png").std() > 0.01
    assert all(w.started for w in db.workers(0) if w.up)  # each life of a replica is told apart
    # and the depth series hold the backlog of the topic without a channel
    channels = db.channels(started)
    assert depth_series(channels)["orphan (topic)"][-1][1] == ORPHANS
    # and the charts of the run can be read: legend outside the plot, time labels that differ
    topics = {f"{name}.{k}": name for name in ("ticks", "features") for k in range(REPLICAS)}
    assert throughput_series(channels, topics)["ticks"] and depth_series(channels, topics)["ticks/features"]
    for series in (throughput_series(channels, topics), depth_series(channels, topics)):
        assert_readable(draw(series, "chart", "messages"))
