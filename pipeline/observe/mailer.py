"""Sending the daily health report: SMTP, the schedule, and retries with back-off.

:class:`ReportScheduler` is ticked by the monitor's report thread. A report is
due when the latest scheduled time (``report.at`` in ``report.timezone``) is
later than the last one handled, so a monitor that was down at that time sends
on start. The first start of a monitor on a fresh health.db sends nothing for
a time that had already passed. A failed send is logged and retried after
30 s, 1 min, 2 min ... up to 30 min, until it goes through; sampling runs in
another thread and never waits for it.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import smtplib
import ssl
import time
import zoneinfo
from collections.abc import Callable
from email.message import EmailMessage

from prometheus_client import CollectorRegistry, Counter

from pipeline.config import ReportSpec
from pipeline.observe.healthdb import HealthDB

log = logging.getLogger(__name__)

RETRY_BASE, RETRY_MAX = 30.0, 1800.0
LAST_SLOT = "report_last_slot"  # meta key: the scheduled time (epoch s) of the last report handled


def send_email(spec: ReportSpec, msg: EmailMessage) -> None:
    """Send ``msg`` through the report's SMTP server.

    Raises:
        OSError, smtplib.SMTPException: the server could not be reached or refused the message.
    """
    smtp = spec.smtp
    context = ssl.create_default_context()
    if smtp.security == "ssl":
        client: smtplib.SMTP = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    with client:
        if smtp.security == "starttls":
            client.starttls(context=context)
        if smtp.user:
            client.login(smtp.user, os.environ.get(smtp.password_env or "", ""))
        client.send_message(msg, from_addr=spec.sender, to_addrs=list(spec.to))


def latest_slot(spec: ReportSpec, now: float) -> float:
    """The most recent scheduled report time at or before ``now`` (epoch seconds)."""
    local = dt.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(spec.timezone))
    for day in (local.date(), local.date() - dt.timedelta(days=1)):
        slot = spec.send_time(day).timestamp()
        if slot <= now:
            return slot
    return spec.send_time(local.date() - dt.timedelta(days=2)).timestamp()


class ReportScheduler:
    """Decides when the daily report is due, builds it and sends it, retrying failures.

    Parameters:
        topology: with a ``report`` section.
        db: the monitor's health.db (remembers the last report across restarts).
        clock: seconds since the epoch (injectable).
        send: sends one email (default: :func:`send_email` with the topology's SMTP settings).
    """

    def __init__(self, topology, db: HealthDB, *, clock: Callable[[], float] = time.time,
                 send: Callable[[EmailMessage], None] | None = None, registry: CollectorRegistry | None = None):
        self.topology, self.spec, self.db, self.clock = topology, topology.report, db, clock
        self.send = send or (lambda msg: send_email(self.spec, msg))
        self.failures = 0
        self.next_attempt = 0.0
        self.sent = Counter("pipeline_monitor_reports_sent", "Health reports sent.", registry=registry)
        self.failed = Counter("pipeline_monitor_report_failures", "Failed attempts to send the health report.",
                              registry=registry)
        if self.db.meta(LAST_SLOT) is None:  # a fresh monitor: the slot already past is not owed
            self.db.set_meta(LAST_SLOT, latest_slot(self.spec, clock()))

    def due(self, now: float) -> float | None:
        """The slot whose report is owed at ``now``, or None."""
        slot = latest_slot(self.spec, now)
        return slot if slot > float(self.db.meta(LAST_SLOT, 0.0)) and now >= self.next_attempt else None

    def tick(self) -> bool:
        """Send the report if it is due; return True when one was sent."""
        now = self.clock()
        slot = self.due(now)
        if slot is None:
            return False
        from pipeline.observe.report import build_report, to_email  # matplotlib loads only when a report is built
        report = build_report(self.topology, self.db, until=now)
        try:
            self.send(to_email(report, self.spec.sender, list(self.spec.to)))
        except (OSError, smtplib.SMTPException) as e:
            self.failures += 1
            delay = min(RETRY_BASE * 2 ** (self.failures - 1), RETRY_MAX)
            self.next_attempt = now + delay
            self.failed.inc()
            log.error("health report not sent (attempt %d): %s; next attempt in %gs", self.failures, e, delay)
            return False
        self.failures, self.next_attempt = 0, 0.0
        self.db.set_meta(LAST_SLOT, slot)
        self.db.set_meta("report_last_sent", now)
        self.sent.inc()
        log.info("health report sent to %s: %s", ", ".join(self.spec.to), report.subject)
        return True
