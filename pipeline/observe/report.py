"""The health report: verdict, reasons, tables, charts and dead letters, as text, HTML and an email.

The email is ``multipart/alternative``: a plain-text part and an HTML part
whose charts are inline PNG images (``multipart/related``, ``cid:`` links).
``pipeline report --out DIR`` writes the same things as files, and each chart
as a PNG of its own::

    report = build_report(topology, db, until=time.time())
    write_files(report, Path("out"))   # report.txt, report.html, report.eml, throughput.png, depth.png
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import zoneinfo
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from pipeline.observe.health import Health, assess
from pipeline.observe.healthdb import HealthDB
from pipeline.observe.report_charts import charts

DAY = 86400.0
CHART_TITLES = {"throughput": "Throughput per topic (messages/s)",
                "depth": "Depth per topic and channel, deferred included (messages)"}


@dataclass
class Report:
    """One report: the health of a window, its charts, and where it was built."""

    pipeline: str
    health: Health
    charts: dict[str, bytes]
    tz: str = "UTC"

    @property
    def subject(self) -> str:
        """The email subject: verdict first, so an inbox shows it."""
        return f"[{self.health.verdict}] {self.pipeline} health report, {self._when(self.health.until)}"

    def _when(self, ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, zoneinfo.ZoneInfo(self.tz)).strftime("%Y-%m-%d %H:%M %Z")


def build_report(topology, db: HealthDB, until: float, since: float | None = None) -> Report:
    """The report of ``topology`` over ``[since, until]`` (default: the 24 h before ``until``)."""
    since = until - DAY if since is None else since
    spec = topology.report
    health = assess(topology, db, since, until, spec)
    tz = spec.timezone if spec else "UTC"
    name = Path(topology.path).parent.name if topology.path else "pipeline"
    topics = {physical: topic for topic in topology.topics for physical in topology.physical_topics(topic)}
    return Report(name, health, charts(db.channels(since, until), tz, topics), tz)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 10 or value == 0 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the text and HTML renderings."""
    h = report.health
    channels = [[r.topic, r.channel or "(topic)", _fmt(r.depth), _fmt(r.max_depth), _fmt(r.in_flight),
                 _fmt(r.messages), _fmt(r.rate), _fmt(r.requeued), _fmt(r.timed_out), _fmt(r.clients)]
                for r in h.channels]
    stages = [[s.stage, _fmt(s.replicas), _fmt(s.processed), _fmt(s.dead_letters), _fmt(s.requeued),
               _fmt(s.publish_errors), _fmt(s.restarts), _fmt(s.p99_s)] for s in h.stages]
    dead = [[report._when(ts), topic, stage, reason, (body or "")[:120]] for ts, topic, stage, reason, body in
            h.dead_letters]
    return [
        ("Topics and channels", ["topic", "channel", "depth", "max depth", "in flight", "messages", "msg/s",
                                 "requeued", "timed out", "clients"], channels),
        ("Stages", ["stage", "replicas", "processed", "dead letters", "requeued", "publish errors", "restarts",
                    "e2e p99 (s)"], stages),
        ("Latest dead letters", ["time", "topic", "stage", "reason", "body"], dead),
    ]


def render_text(report: Report) -> str:
    """The plain-text report."""
    h = report.health
    lines = [report.subject, "", f"Verdict: {h.verdict}", f"Window: {report._when(h.since)} .. "
             f"{report._when(h.until)} ({h.samples} samples)", ""]
    lines += [f"- {r.level}: {r.text}" for r in h.reasons] or ["- no problems found"]
    for title, header, rows in tables(report):
        lines += ["", title, ""]
        if not rows:
            lines.append("(none)")
            continue
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=False)]
        for row in [header, ["-" * w for w in widths], *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    lines += ["", f"Charts ({', '.join(report.charts)}): in the HTML version; `pipeline report --out DIR` "
                  "writes them as PNG files too."]
    return "\n".join(lines) + "\n"


def render_html(report: Report, image_src: dict[str, str]) -> str:
    """The HTML report; ``image_src`` maps a chart name to its ``src`` (a ``cid:`` or a file name)."""
    h = report.health
    colour = {"OK": "#2e7d32", "WARN": "#ef6c00", "CRIT": "#c62828"}[h.verdict]
    esc = html.escape
    parts = [f"<html><body style='font-family:sans-serif'><h2>{esc(report.subject)}</h2>",
             f"<p style='font-size:20px'>Verdict: <b style='color:{colour}'>{h.verdict}</b></p>",
             f"<p>Window: {esc(report._when(h.since))} .. {esc(report._when(h.until))} ({h.samples} samples)</p>",
             "<ul>" + ("".join(f"<li><b>{r.level}</b>: {esc(r.text)}</li>" for r in h.reasons)
                       or "<li>no problems found</li>") + "</ul>"]
    for name, src in image_src.items():
        parts.append(f"<h3>{esc(CHART_TITLES.get(name, name))}</h3><img src='{esc(src)}' alt='{esc(name)} chart'>")
    for title, header, rows in tables(report):
        parts.append(f"<h3>{esc(title)}</h3>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table border='1' cellspacing='0' cellpadding='3'><tr>"
                     + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                     + "</table>")
    return "".join(parts) + "</body></html>\n"


def to_email(report: Report, sender: str = "pipeline@localhost", to: list[str] | None = None) -> EmailMessage:
    """The report as a ``multipart/alternative`` email with inline PNG charts."""
    msg = EmailMessage()
    msg["Subject"] = report.subject
    msg["From"] = sender
    msg["To"] = ", ".join(to or [])
    msg["Date"] = formatdate(report.health.until, localtime=False)
    msg["X-Pipeline-Verdict"] = report.health.verdict
    cids = {name: make_msgid(domain="nsq-pipeline") for name in report.charts}
    msg.set_content(render_text(report))
    msg.add_alternative(render_html(report, {n: f"cid:{c[1:-1]}" for n, c in cids.items()}), subtype="html")
    html_part = list(msg.iter_parts())[1]
    for name, png in report.charts.items():
        html_part.add_related(png, "image", "png", cid=cids[name], filename=f"{name}.png")
    return msg


def write_files(report: Report, out: Path, sender: str = "pipeline@localhost",
                to: list[str] | None = None) -> list[Path]:
    """Write ``report.txt``, ``report.html`` (charts inline as data URIs, so it stands alone), ``report.eml``
    and each chart as ``NAME.png`` into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.txt", out / "report.html", out / "report.eml"]
    paths[0].write_text(render_text(report))
    inline = {n: "data:image/png;base64," + base64.b64encode(png).decode() for n, png in report.charts.items()}
    paths[1].write_text(render_html(report, inline))
    paths[2].write_bytes(bytes(to_email(report, sender, to)))
    for name, png in report.charts.items():
        paths.append(out / f"{name}.png")
        paths[-1].write_bytes(png)
    return paths


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number followed by s, m, h or d (``24h``, ``90m``).

    Raises:
        ValueError: not such a duration; the message shows the form expected.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ValueError(f"{text!r} is not a duration such as 24h, 90m, 2d or 3600s")
    return value * units[unit]
