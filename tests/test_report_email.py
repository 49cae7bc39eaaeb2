"""The daily report by email: a real SMTP server (aiosmtpd) on 127.0.0.1 and an injected clock."""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import io
import os
import signal
import time

import matplotlib.image
import pytest
import yaml
from aiosmtpd.controller import Controller

from nsqhttp import channel_stats, http_pub, wait_until
from pipeline.client import nsqd_http
from pipeline.observe.healthdb import HealthDB
from pipeline.observe.mailer import LAST_SLOT
from pipeline.observe.monitor import Monitor
from pipeline.ops.processes import consecutive_free_ports, free_port
from pipeline.observe.report import build_report
from pipeline.config import load_topology
from producers.numbers import produce_numbers
from test_monitor import scrape
from test_supervise import Deployment

pytestmark = pytest.mark.integration


class Clock:
    """Wall-clock time shifted by an offset the test moves."""

    def __init__(self, start: dt.datetime):
        self.set(start)

    def set(self, when: dt.datetime) -> None:
        self.offset = when.timestamp() - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


class Inbox:
    """An aiosmtpd handler keeping every message it receives."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture
def smtp():
    """Start/stop a real SMTP server on a fixed free port (stopped at teardown)."""
    port = free_port()
    inbox = Inbox()
    controllers: list[Controller] = []

    class Server:
        def __init__(self):
            self.port, self.inbox = port, inbox

        def start(self):
            controllers.append(Controller(inbox, hostname="127.0.0.1", port=port))
            controllers[-1].start()

        def stop(self):
            controllers.pop().stop()

    server = Server()
    yield server
    while controllers:
        server.stop()


# The report time is 12 h away from the real clock, so a monitor on the real clock (the one supervisord
# runs) never sends during a test; the monitors under test get a clock the test moves past it.
SLOT = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=12)).replace(minute=0, second=0, microsecond=0)


def report_section(port: int) -> dict:
    return {"at": SLOT.strftime("%H:%M"), "timezone": "UTC", "to": ["ops@example.com"], "from": "pipeline@example.com",
            "smtp": {"host": "127.0.0.1", "port": port, "security": "none", "timeout": 5}}


def at(seconds: float) -> dt.datetime:
    """The report time plus ``seconds`` (negative: before it)."""
    return SLOT + dt.timedelta(seconds=seconds)


def test_smtp_down_at_send_time_keeps_sampling_retries_and_sends_once_back(nsqd, tmp_path, smtp):
    # Given a monitor whose clock is just before the report time, and no SMTP server yet
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
           "report": report_section(smtp.port)}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    clock = Clock(at(-10))
    monitor = Monitor(load_topology(path), clock=clock, interval=0.05)
    monitor.start()
    try:
        wait_until(lambda: monitor.db.sample_count("nsqd") >= 2, 10, message="monitor never sampled")
        assert not smtp.inbox.messages
        # When the clock passes the report time while SMTP is down
        clock.set(at(5))
        wait_until(lambda: monitor.reporter.failures >= 1, 10, message="no send attempt")
        # Then sampling goes on, and nothing is marked sent
        samples = monitor.db.sample_count("nsqd")
        wait_until(lambda: monitor.db.sample_count("nsqd") >= samples + 3, 10, message="sampling stopped")
        assert monitor.db.meta(LAST_SLOT) < at(0).timestamp()
        # When SMTP is back and the back-off has passed
        smtp.start()
        clock.set(at(120))
        wait_until(lambda: smtp.inbox.messages, 15, message="report never sent once SMTP was back")
        wait_until(lambda: monitor.db.meta(LAST_SLOT) == at(0).timestamp(), 5, message="slot not recorded")
        assert monitor.reporter.tick() is False  # sent once: nothing more is due today
    finally:
        monitor.close()
    assert len(smtp.inbox.messages) == 1
    assert monitor.reporter.failures == 0


def worker_logs(d: Deployment) -> str:
    """The tail of each primes worker's log, for a failure message."""
    logs = sorted((d.dir / "var" / "log").glob("primes-*.log"))
    return "\n".join(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:] for log in logs)


def parts(msg) -> tuple[str, str, list[bytes]]:
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    images = [p.get_content() for p in msg.walk() if p.get_content_type() == "image/png"]
    return text, html, images


def test_scheduled_report_is_ok_for_a_clean_run_and_warn_after_dead_letters_and_a_killed_worker(nsq_bin, smtp):
    # Given the primes pipeline under supervisord, with worker metrics and a daily report
    d = Deployment(msg_timeout=10)
    monitor = None
    try:
        doc = yaml.safe_load(d.path.read_text())
        doc["stages"]["primes"]["metrics_port"] = consecutive_free_ports(2)
        doc["report"] = report_section(smtp.port)
        exporter = free_port()
        doc["monitor"] = {"interval": 0.5, "listen": f"127.0.0.1:{exporter}"}  # supervisord runs this one
        d.path.write_text(yaml.safe_dump(doc, sort_keys=False))
        d.topology = load_topology(d.path)
        smtp.start()
        d.up()
        d.checked_outputs()  # numbers.dead has a channel, so the monitors may watch it
        # The test's own monitor, on its own health.db, with a clock the test moves
        clock = Clock(at(-1800))
        monitor = Monitor(d.topology, clock=clock, interval=0.2, db_path=d.dir / "test-health.db")
        monitor.start(serve=False)  # the port is supervisord's monitor's
        # When 2,000 numbers are classified cleanly
        produce_numbers(d.tcp, "numbers", 1, 2000, run_id="s")
        finished_by_replica = lambda: [max((w.finished for w in monitor.db.workers(0) if w.replica == k),  # noqa
                                           default=0) for k in (0, 1)]
        finished = lambda: sum(finished_by_replica())  # noqa: E731
        try:
            wait_until(lambda: finished() >= 2000, 60, message="the monitor never saw 2000 finished")
        except AssertionError as e:
            raise AssertionError(f"{e}; finished per replica as sampled: {finished_by_replica()}\n{worker_logs(d)}") \
                from None
        # Then a report of the run so far is OK
        clean = build_report(d.topology, monitor.db, until=clock())
        assert clean.health.verdict == "OK", clean.health.reasons
        assert not smtp.inbox.messages  # the report time has not come yet
        # and the monitor that supervisord runs serves the depth nsqd reports, and samples into var/health.db
        assert {p.name: p.state for p in d.supervisor().processes()}["monitor"] == "RUNNING"
        labels = (("channel", "primes"), ("nsqd", "n0"), ("topic", "numbers"))
        assert scrape(exporter)[("nsq_channel_depth", labels)] == channel_stats(d.http, "numbers", "primes")["depth"]
        assert HealthDB(d.dir / "var" / "health.db").sample_count("nsqd") >= 1

        # When 3 undecodable messages are dead-lettered and a replica is SIGKILLed (supervisord restarts it)
        for i in range(3):
            assert http_pub(d.http, "numbers", b"not json %d" % i) == (200, "OK")
        wait_until(lambda: nsqd_http.topic_message_count(d.http, "numbers.dead") == 3, 30, message="no dead letters")
        victim = d.worker_pids()["primes-0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: any(p.name == "primes-0" and p.pid not in (0, victim) and p.state == "RUNNING"
                               for p in monitor.db.processes(0)), 30, message="restart never sampled")
        wait_until(lambda: any(c.topic == "numbers.dead" and c.channel == "" and c.messages == 3
                               for c in monitor.db.channels(0)), 10, message="dead letters never sampled")
        wait_until(lambda: monitor.db.dead_letters(0), 10, message="no dead-letter sample")
        # and the clock passes the report time
        clock.set(at(5))
        wait_until(lambda: smtp.inbox.messages, 60, message="no report received after the report time")
    finally:
        if monitor is not None:
            monitor.close()
        d.close()
    # Then the report says WARN, for exactly those two reasons, in text and HTML, with two real charts
    [msg] = smtp.inbox.messages
    assert msg["Subject"].startswith("[WARN]") and msg["X-Pipeline-Verdict"] == "WARN"
    assert msg["To"] == "ops@example.com"
    text, html, images = parts(msg)
    reasons = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(reasons) == 2, reasons
    assert any("3 dead letter(s) on numbers.dead" in r for r in reasons)
    assert any("restart(s): primes:primes-0 (1)" in r for r in reasons)
    assert "Verdict: WARN" in text and ">WARN</b>" in html and "not json" in text
    assert len(images) >= 2
    for png in images:
        assert matplotlib.image.imread(io.BytesIO(png), format="png").std() > 0.01
    assert html.count("src='cid:") == len(images)


def test_pipeline_report_send_delivers_the_report_now(tmp_path, smtp):
    from test_report import fill_day, run_cli, write_topology
    path = write_topology(tmp_path, report_section(smtp.port))
    db = HealthDB(tmp_path / "var" / "health.db")
    fill_day(db)
    db.close()
    smtp.start()
    result = run_cli("report", "--since", "40000d", "--send", "-t", str(path))
    assert result.returncode == 0, result.stderr  # a healthy day: OK
    assert "sent to ops@example.com: [OK]" in result.stdout
    [msg] = smtp.inbox.messages
    text, html, images = parts(msg)
    assert msg["X-Pipeline-Verdict"] == "OK" and "- no problems found" in text and len(images) == 2
