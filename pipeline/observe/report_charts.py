"""The health report's charts: throughput and depth over the window, as PNG bytes (matplotlib, no display).

Each chart has labelled axes with units and at most :data:`MAX_LINES` lines
(the busiest series), so it stays readable in an email.
"""
from __future__ import annotations

import datetime as dt
import io
import zoneinfo
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # render to memory; the monitor has no display
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.observe.healthdb import ChannelSample  # noqa: E402

MAX_LINES = 8
SIZE_INCHES, DPI = (8.0, 3.2), 100


def throughput_series(channels: list[ChannelSample]) -> dict[str, list[tuple[float, float]]]:
    """Messages/s published to each topic between consecutive samples, summed over nsqd nodes."""
    per_node: dict[tuple[str, str], list[ChannelSample]] = defaultdict(list)
    for c in channels:
        if c.channel == "":
            per_node[(c.topic, c.nsqd)].append(c)
    series: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (topic, _), samples in per_node.items():
        for a, b in zip(samples, samples[1:], strict=False):
            if b.ts > a.ts:
                grown = b.messages - a.messages if b.messages >= a.messages else b.messages
                series[topic][b.ts] += grown / (b.ts - a.ts)
    return {t: sorted(points.items()) for t, points in series.items()}


def depth_series(channels: list[ChannelSample]) -> dict[str, list[tuple[float, float]]]:
    """Depth of each channel (``topic/channel``) at each sample, summed over nsqd nodes."""
    series: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for c in channels:
        if c.channel:
            series[f"{c.topic}/{c.channel}"][c.ts] += c.depth
    return {name: sorted(points.items()) for name, points in series.items()}


def draw(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, tz: str = "UTC"):
    """A matplotlib figure of the busiest ``series`` over time; says so when there is no data."""
    zone = zoneinfo.ZoneInfo(tz)
    busiest = sorted(series.items(), key=lambda kv: -sum(v for _, v in kv[1]))[:MAX_LINES]
    fig, ax = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    for name, points in busiest:
        times = [dt.datetime.fromtimestamp(ts, zone) for ts, _ in points]
        ax.plot(times, [v for _, v in points],  # type: ignore[arg-type]  # the stubs omit datetimes (date units)
                label=name, linewidth=1.5, marker="." if len(points) < 30 else None)
    if not busiest:
        ax.text(0.5, 0.5, "no samples in this window", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(f"time ({tz})")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=zone))
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    if busiest:
        ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """Render ``fig`` as PNG bytes and free it."""
    try:
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


def charts(channels: list[ChannelSample], tz: str = "UTC") -> dict[str, bytes]:
    """The report's charts by name: ``throughput`` and ``depth``."""
    return {
        "throughput": to_png(draw(throughput_series(channels), "Throughput per topic", "messages/s", tz)),
        "depth": to_png(draw(depth_series(channels), "Depth per channel", "depth (messages)", tz)),
    }
