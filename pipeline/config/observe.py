"""The topology's `monitor` and `report` sections: sampling, retention, and the daily health email.

Declared once here, validated when the topology loads (a bad time or an
unknown timezone fails at `pipeline check` with file:line:col), and listed in
docs/TOPOLOGY.md like every other section. Whether the SMTP password's
environment variable is set is checked by :func:`environment_problems`, which
`pipeline check` and `pipeline monitor` run (workers do not need it).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.config.types import check_address, problem


def _clock_time(value: str) -> str:
    if not re.fullmatch(r"\d{1,2}:\d{2}", value):
        raise problem(f"time {value!r} must be HH:MM (24-hour clock), e.g. 08:00")
    hour, minute = map(int, value.split(":"))
    if hour > 23 or minute > 59:
        raise problem(f"time {value!r} is not a time of day: hours 0..23, minutes 0..59")
    return value


def _timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise problem(f"unknown timezone {value!r}; use an IANA name such as UTC or Europe/Paris") from None
    return value


def _email(value: str) -> str:
    if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value):
        raise problem(f"{value!r} is not an email address (name@host)")
    return value


ClockTime = Annotated[str, AfterValidator(_clock_time)]
TimeZone = Annotated[str, AfterValidator(_timezone)]
Email = Annotated[str, AfterValidator(_email)]
Listen = Annotated[str, AfterValidator(check_address)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, populate_by_name=True)


class MonitorSpec(_Section):
    """`pipeline monitor`: samples NSQ, supervisord, workers and the host into `<var_dir>/health.db`."""

    interval: float = Field(10.0, ge=0.05, le=3600, description="Seconds between samples.")
    listen: Listen | None = Field(
        None, description="host:port where the monitor serves NSQ stats as Prometheus metrics (`/metrics`);"
                          " null: not served.",
    )
    retention_days: float = Field(30.0, gt=0, le=3650, description="Samples older than this are deleted.")
    max_db_mb: int = Field(512, ge=1, le=1_000_000,
                           description="Largest size of health.db; the oldest samples go first beyond it.")


class SmtpSpec(_Section):
    """How the report is sent."""

    host: str = Field(min_length=1, description="SMTP server host.")
    port: int = Field(587, ge=1, le=65535, description="SMTP server port.")
    security: Literal["starttls", "ssl", "none"] = Field(
        "starttls", description="`starttls` (upgrade a plain connection), `ssl` (TLS from the start), `none`.")
    user: str | None = Field(None, description="Login user; null: no login.")
    password_env: str | None = Field(
        None, pattern=r"[A-Za-z_][A-Za-z0-9_]*",
        description="Environment variable holding the password (never the password itself); must be set where"
                    " `pipeline check` and the monitor run.")
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds per SMTP operation.")


class ReportSpec(_Section):
    """The daily health report: built over the last 24 h and sent by the monitor at `at` in `timezone`."""

    at: ClockTime = Field("08:00", description="Time of day to send the report, HH:MM.")
    timezone: TimeZone = Field("UTC", description="IANA timezone of `at`.")
    to: list[Email] = Field(min_length=1, description="Recipients.")
    sender: Email = Field(alias="from", description="Sender address (`from:` in the file).")
    smtp: SmtpSpec = Field(description="The SMTP server.")
    e2e_p99_max: float = Field(60.0, gt=0, description="Seconds of end-to-end p99 latency above which the"
                                                       " verdict is WARN.")
    depth_growth_minutes: float = Field(60.0, gt=0, description="A channel whose depth has only grown for this"
                                                                " long makes the verdict WARN.")
    chaos_result: str = Field(
        "chaos/last.json",
        description="A chaos run's result file (relative to var_dir), JSON `{\"ok\": bool, \"finished_at\": epoch"
                    " seconds, \"scenario\": name, \"failures\": [...]}`; a failed run in the window makes the"
                    " verdict CRIT.")

    def send_time(self, day: dt.date) -> dt.datetime:
        """The moment the report of ``day`` is due, as an aware datetime."""
        hour, minute = map(int, self.at.split(":"))
        return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=zoneinfo.ZoneInfo(self.timezone))


def environment_problems(topology) -> list[tuple[tuple[Any, ...], str]]:
    """What the environment lacks for the topology's report: (location, reason) pairs."""
    report = getattr(topology, "report", None)
    if report is None or not report.smtp.password_env:
        return []
    if os.environ.get(report.smtp.password_env) is None:
        return [(("report", "smtp", "password_env"),
                 f"environment variable {report.smtp.password_env} (the SMTP password) is not set")]
    return []
