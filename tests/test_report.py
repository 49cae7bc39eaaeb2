"""The health report: verdicts from samples, the files of `pipeline report --out`, config errors at check."""
from __future__ import annotations

import base64
import email
import email.policy
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from pipeline.observe.health import assess, counter_total, stage_table
from pipeline.observe.healthdb import HealthDB, WorkerSample
from pipeline.observe.report_charts import TOP, depth_series, draw, throughput_series
from pipeline.config import load_topology

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
T0 = 1_700_000_000.0  # the end of the synthetic day (in the past, so reports ending now include it)


def write_topology(tmp_path: Path, report: dict | None = None) -> Path:
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:1", "http": "127.0.0.1:2"}], "var_dir": "var"},
           "topics": {"numbers": {}, "prime": {}, "non_prime": {}},
           "stages": {"primes": {"handler": "consumers.primes:classify", "input": "numbers", "channel": "primes",
                                 "outputs": ["prime", "non_prime"], "replicas": 2, "metrics_port": 19300}}}
    if report is not None:
        doc["report"] = report
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fill_day(db: HealthDB, *, dead_at: float | None = None, restart_at: float | None = None,
             stall_from: float | None = None) -> None:
    """24 h of samples every 10 min of a busy, healthy primes pipeline, with optional faults."""
    total = 0
    for i in range(145):
        ts = T0 - DAY + i * 600
        total += 6000 + int(3000 * math.sin(i / 10))
        depth = 50 + int(40 * math.sin(i * 1.3))  # up and down between samples
        stalled = stall_from is not None and ts >= stall_from
        dead = 3 if dead_at is not None and ts >= dead_at else 0
        db.insert("channel", [
            (ts, "n0", "numbers", "", 0, 0, 0, 0, 0, 0, total, 0, None),
            (ts, "n0", "numbers", "primes", depth + (i * 100 if stalled else 0), 0, 10, 0, 0, 0, total, 2, None),
            (ts, "n0", "prime", "", 0, 0, 0, 0, 0, 0, total // 10, 0, None),
            (ts, "n0", "numbers.dead", "", dead, 0, 0, 0, 0, 0, dead, 0, None)])
        db.insert("nsqd", [(ts, "n0", "127.0.0.1:2", "OK")])
        pid0 = 101 if restart_at is None or ts < restart_at else 202
        db.insert("process", [(ts, "primes-0", "primes", "RUNNING", pid0, 5.0, 80_000_000),
                              (ts, "primes-1", "primes", "RUNNING", 102, 5.0, 80_000_000)])
        finished = total // 2 if not stalled else (stall_from - T0 + DAY) // 600 * 3000
        buckets = json.dumps([["0.01", finished * 0.9], ["0.1", finished], ["+Inf", finished]])
        db.insert("worker", [(ts, "primes", k, 1, finished, finished, 0, 0, 0, buckets) for k in (0, 1)])


def reasons(health) -> dict[str, str]:
    return {r.kind: r.level for r in health.reasons}


def test_a_healthy_day_is_ok_and_faults_give_their_reasons(tmp_path):
    topology = load_topology(write_topology(tmp_path))
    clean = HealthDB(tmp_path / "clean.db")
    fill_day(clean)
    health = assess(topology, clean, T0 - DAY, T0)
    assert health.verdict == "OK", health.reasons
    assert {s.stage: (s.restarts, s.dead_letters, s.p99_s) for s in health.stages} == {"primes": (0, 0, 0.1)}

    faulty = HealthDB(tmp_path / "faulty.db")
    fill_day(faulty, dead_at=T0 - 3600, restart_at=T0 - 7200)
    health = assess(topology, faulty, T0 - DAY, T0)
    assert health.verdict == "WARN"
    assert reasons(health) == {"dead_letters": "WARN", "restarts": "WARN"}
    assert "3 dead letter(s) on numbers.dead" in " ".join(r.text for r in health.reasons)


def test_a_stage_that_stops_while_its_input_grows_is_critical(tmp_path):
    topology = load_topology(write_topology(tmp_path))
    db = HealthDB(tmp_path / "health.db")
    fill_day(db, stall_from=T0 - 5400)
    health = assess(topology, db, T0 - DAY, T0)
    assert health.verdict == "CRIT"
    assert reasons(health) == {"stalled": "CRIT", "depth_growing": "WARN"}


def test_charts_have_labelled_axes_with_units(tmp_path):
    db = HealthDB(tmp_path / "health.db")
    fill_day(db)
    channels = db.channels(0)
    for series, ylabel in ((throughput_series(channels), "messages/s"), (depth_series(channels), "depth (messages)")):
        fig = draw(series, "t", ylabel, "Europe/Paris")
        ax = fig.axes[0]
        assert ax.get_xlabel() == "time (Europe/Paris)" and ax.get_ylabel() == ylabel
        assert ax.get_lines()


def test_a_counter_is_summed_across_restarts_and_from_a_process_start_inside_the_window():
    since = 1000.0
    # a process that started before the window: only what it did inside counts
    assert counter_total([(500.0, 40), (500.0, 70), (500.0, 100)], since) == 60
    # one started inside it: its first sample counts from zero (the monitor saw it late)
    assert counter_total([(1200.0, 40), (1200.0, 70)], since) == 70
    # a restart between samples whose new life already passed the old count: the new start time tells
    assert counter_total([(1200.0, 40), (1200.0, 70), (1300.0, 90), (1300.0, 95)], since) == 70 + 95
    # samples from before start times were recorded: a fall is a restart from zero
    assert counter_total([(None, 40), (None, 70), (None, 5), (None, 20)], since) == 30 + 20


def worker_row(ts, replica, finished, started):
    return WorkerSample(ts, "primes", replica, 1, finished, finished, 0, 0, 0, "[]", started)


def test_a_stage_total_is_the_sum_of_its_replicas_lives(tmp_path):
    topology = load_topology(write_topology(tmp_path))
    # replica 0 first seen after it had finished 4,939; replica 1 restarted between two samples
    workers = [worker_row(10, 0, 4939, 5.0), worker_row(20, 0, 4939, 5.0),
               worker_row(10, 1, 3000, 5.0), worker_row(20, 1, 2061, 15.0), worker_row(30, 1, 5061, 15.0)]
    [row] = stage_table(topology, workers, [], since=0.0)
    assert row.processed == 4939 + 3000 + 5061


def x_labels(fig) -> list[str]:
    fig.canvas.draw()
    return [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]


def assert_readable(fig) -> None:
    """The legend is outside the plot area and no two labels of the time axis read the same."""
    fig.canvas.draw()
    ax = fig.axes[0]
    [legend] = fig.legends
    plot, box = ax.get_window_extent(), legend.get_window_extent()
    assert box.x0 >= plot.x1 and not ax.get_legend(), (box, plot)
    labels = x_labels(fig)
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


@pytest.mark.parametrize("span", [90, 3600, 6 * 3600, DAY, 3 * DAY, 40 * DAY])
def test_the_time_axis_labels_differ_whatever_the_span(span):
    series = {"numbers": [(T0 + span * i / 50, float(i)) for i in range(51)]}
    fig = draw(series, "t", "messages/s", "Europe/Paris")
    assert_readable(fig)


def test_twelve_topics_show_the_busiest_by_name_and_the_rest_summed(tmp_path):
    # Given 12 topics (4 of them partitions of one) of different volumes over 2 minutes
    topics = {f"ticks.{k}": "ticks" for k in range(4)}
    names = [*topics, *(f"topic{i:02d}" for i in range(8))]
    db = HealthDB(tmp_path / "health.db")
    for step in range(13):
        ts = T0 + step * 10
        db.insert("channel", [(ts, "n0", name, "", 0, 0, 0, 0, 0, 0, step * 100 * (i + 1), 0, None)
                              for i, name in enumerate(names)])
    series = throughput_series(db.channels(0), topics)
    # the partitions are summed into their topic: 9 topics
    assert sorted(series) == ["ticks", *(f"topic{i:02d}" for i in range(8))]
    assert series["ticks"][-1][1] == pytest.approx((1 + 2 + 3 + 4) * 10)  # messages/s
    fig = draw(series, "Throughput", "messages/s")
    assert_readable(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == TOP + 1 and labels[-1] == "other (2)"
    assert labels[0] == "topic07" and "ticks" in labels  # the busiest first; ticks' sum puts it in
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    total = sum(points[-1][1] for points in series.values())
    assert sum(y[-1] for y in lines.values()) == pytest.approx(total)  # every message is on the chart


def test_depth_counts_topic_backlog_channels_and_deferred_messages(tmp_path):
    db = HealthDB(tmp_path / "health.db")
    for step in range(3):
        db.insert("channel", [(T0 + step, "n0", "non_prime", "", 90408 + step, 0, 0, 0, 0, 0, 0, 0, None),
                              (T0 + step, "n0", "numbers", "", 0, 0, 0, 0, 0, 0, 0, 0, None),
                              (T0 + step, "n0", "numbers", "primes", 7, 0, 3, 12, 0, 0, 0, 2, None)])
    series = depth_series(db.channels(0))
    assert series["non_prime (topic)"][-1] == (T0 + 2, 90410)  # a topic without channels keeps it all
    assert series["numbers/primes"][-1][1] == 7 and series["numbers/primes (deferred)"][-1][1] == 12
    labels = [t.get_text() for t in draw(series, "Depth", "depth (messages)").legends[0].get_texts()]
    assert labels == ["non_prime (topic)", "numbers/primes (deferred)", "numbers/primes"]  # no zero lines


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_pipeline_report_out_writes_text_html_and_eml_with_real_charts(tmp_path):
    path = write_topology(tmp_path)
    db = HealthDB(tmp_path / "var" / "health.db")
    fill_day(db, dead_at=T0 - 3600)
    db.insert("dead_letter", [(T0 - 3000, "numbers.dead", "primes", "field 'number' must be an integer", "x")])
    db.close()
    out = tmp_path / "out"
    # the report ends now; --since reaches back over the synthetic day
    result = run_cli("report", "--since", "40000d", "--out", str(out), "-t", str(path))
    assert result.returncode == 1, result.stderr  # WARN: dead letters
    assert sorted(p.name for p in out.iterdir()) == ["depth.png", "report.eml", "report.html", "report.txt",
                                                     "throughput.png"]
    text = (out / "report.txt").read_text()
    assert result.stdout == text  # --out prints the text too
    assert all(png_pixels((out / f"{name}.png").read_bytes()).std() > 0.01 for name in ("depth", "throughput"))
    assert "Verdict: WARN" in text and "3 dead letter(s) on numbers.dead" in text
    assert "field 'number' must be an integer" in text
    msg = email.message_from_bytes((out / "report.eml").read_bytes(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    images = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert len(images) >= 2
    for part in images:
        pixels = png_pixels(part.get_content())
        assert pixels.std() > 0.01, "a blank chart"
    html = (out / "report.html").read_text()
    inline = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(inline) == 2 and all(png_pixels(base64.b64decode(b)).std() > 0.01 for b in inline)


BAD_REPORTS = [
    ("bad-time", {"at": "8h00"}, ".at: time '8h00' must be HH:MM (24-hour clock), e.g. 08:00"),
    ("hour-25", {"at": "25:00"}, ".at: time '25:00' is not a time of day: hours 0..23, minutes 0..59"),
    ("unknown-tz", {"timezone": "Mars/Olympus"},
     ".timezone: unknown timezone 'Mars/Olympus'; use an IANA name such as UTC or Europe/Paris"),
    ("no-password", {}, ".smtp.password_env: environment variable NP_TEST_NO_SUCH_PASSWORD (the SMTP password) "
                        "is not set"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in BAD_REPORTS], ids=[c[0] for c in BAD_REPORTS])
def test_pipeline_check_reports_a_bad_report_section_with_its_place(tmp_path, overrides, expected):
    report = {"at": "08:00", "timezone": "UTC", "to": ["ops@example.com"], "from": "np@example.com",
              "smtp": {"host": "127.0.0.1", "port": 2525, "user": "np", "password_env": "NP_TEST_NO_SUCH_PASSWORD"},
              **overrides}
    path = write_topology(tmp_path, report)
    result = run_cli("check", "-t", str(path))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: report{re.escape(expected)}", line), line


def test_an_unreachable_nsqd_a_failed_chaos_run_and_slow_records_give_their_reasons(tmp_path):
    topology = load_topology(write_topology(tmp_path, report={
        "to": ["ops@example.com"], "from": "np@example.com", "smtp": {"host": "127.0.0.1"}, "e2e_p99_max": 0.05}))
    db = HealthDB(tmp_path / "health.db")
    fill_day(db)  # its records' p99 is 0.1 s, above the 0.05 s allowed here
    db.insert("nsqd", [(T0, "n0", "127.0.0.1:2", "unreachable")])
    (topology.var_dir / "chaos").mkdir(parents=True)
    (topology.var_dir / "chaos" / "last.json").write_text(json.dumps(
        {"ok": False, "finished_at": T0 - 600, "scenario": "kill-nsqd", "failures": ["3 ids lost"]}))
    health = assess(topology, db, T0 - DAY, T0, topology.report)
    assert health.verdict == "CRIT"
    assert reasons(health) == {"nsqd": "CRIT", "chaos": "CRIT", "e2e_p99": "WARN"}
    texts = " | ".join(r.text for r in health.reasons)
    assert "nsqd n0 is unreachable" in texts and "chaos run kill-nsqd failed: 3 ids lost" in texts
