"""The health report's charts: throughput and depth over the window, as PNG bytes (matplotlib, no display).

Each chart is meant to be read at a glance in an email:

- the partitions of a topic (``ticks.0`` .. ``ticks.3``) are summed into the topic
  the topology declares (``ticks``);
- the :data:`TOP` busiest series are drawn by name and the rest summed into one
  ``other (N)`` line, so every message is on the chart and the legend stays short;
- the legend sits outside the plot area, to the right, so it never hides a peak;
- the time axis takes its ticks from :class:`matplotlib.dates.AutoDateLocator` and
  labels them to the precision of their spacing (seconds for a short run, weekday
  and hour for a day or more), so no two labels read the same.

The depth chart shows every queue a message can wait in: a channel's depth, its
deferred messages (requeued with a delay), and the depth of the topic itself,
which is where a topic without any channel keeps everything published to it.
"""
from __future__ import annotations

import datetime as dt
import io
import zoneinfo
from collections import defaultdict
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # render to memory; the monitor has no display
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.observe.healthdb import ChannelSample  # noqa: E402

TOP = 7  # series drawn by name; the others are summed into one line
SIZE_INCHES, DPI = (10.0, 3.6), 100
Series = dict[str, list[tuple[float, float]]]


def _name(topics: Mapping[str, str] | None):
    """Physical topic -> the topic the topology declares (a partition's topic), else itself."""
    return lambda topic: (topics or {}).get(topic, topic)


def throughput_series(channels: list[ChannelSample], topics: Mapping[str, str] | None = None) -> Series:
    """Messages/s published to each topic between consecutive samples, summed over nsqd nodes and partitions.

    ``topics`` maps a physical topic (``ticks.2``) to the topic it belongs to (``ticks``).
    """
    name = _name(topics)
    per_node: dict[tuple[str, str], list[ChannelSample]] = defaultdict(list)
    for c in channels:
        if c.channel == "":
            per_node[(c.topic, c.nsqd)].append(c)
    series: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (topic, _), samples in per_node.items():
        for a, b in zip(samples, samples[1:], strict=False):
            if b.ts > a.ts:
                grown = b.messages - a.messages if b.messages >= a.messages else b.messages
                series[name(topic)][b.ts] += grown / (b.ts - a.ts)
    return {t: sorted(points.items()) for t, points in series.items()}


def depth_series(channels: list[ChannelSample], topics: Mapping[str, str] | None = None) -> Series:
    """Messages waiting at each sample, summed over nsqd nodes and partitions, per queue.

    ``TOPIC (topic)``: undelivered messages in the topic itself (all of a topic
    without channels); ``TOPIC/CHANNEL``: a channel's depth;
    ``TOPIC/CHANNEL (deferred)``: its messages requeued with a delay, not yet due.
    """
    name = _name(topics)
    series: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for c in channels:
        if c.channel:
            series[f"{name(c.topic)}/{c.channel}"][c.ts] += c.depth
            series[f"{name(c.topic)}/{c.channel} (deferred)"][c.ts] += c.deferred
        else:
            series[f"{name(c.topic)} (topic)"][c.ts] += c.depth
    return {label: sorted(points.items()) for label, points in series.items()}


def busiest(series: Series, top: int = TOP) -> Series:
    """The ``top`` series with the most volume by name, the rest summed at each time as ``other (N)``.

    Series that are zero throughout are left out, unless every series is.
    """
    volume = {label: sum(abs(v) for _, v in points) for label, points in series.items()}
    ranked = sorted(series, key=lambda label: (-volume[label], label))
    if any(volume.values()):
        ranked = [label for label in ranked if volume[label] > 0]
    if len(ranked) <= top + 1:  # one more line beats an "other" of one
        return {label: series[label] for label in ranked}
    other: dict[float, float] = defaultdict(float)
    for label in ranked[top:]:
        for ts, v in series[label]:
            other[ts] += v
    return {**{label: series[label] for label in ranked[:top]}, f"other ({len(ranked) - top})": sorted(other.items())}


def draw(series: Series, title: str, ylabel: str, tz: str = "UTC"):
    """A matplotlib figure of the busiest ``series`` over time; says so when there is no data."""
    zone = zoneinfo.ZoneInfo(tz)
    shown = busiest(series)
    fig, ax = plt.subplots(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    for label, points in shown.items():
        times = [dt.datetime.fromtimestamp(ts, zone) for ts, _ in points]
        other = label.startswith("other (")
        ax.plot(times, [v for _, v in points],  # type: ignore[arg-type]  # the stubs omit datetimes (date units)
                label=label, linewidth=1.5, marker="." if len(points) < 30 else None,
                color="0.5" if other else None, linestyle="--" if other else "-")
    stamps = [ts for points in shown.values() for ts, _ in points]
    if not stamps:
        ax.text(0.5, 0.5, "no samples in this window", ha="center", va="center", transform=ax.transAxes)
    else:
        time_axis(ax, min(stamps), max(stamps), zone)
    ax.set_title(title)
    ax.set_xlabel(f"time ({tz})")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    if shown:
        fig.legend(loc="outside right upper", fontsize="small")
    return fig


def time_axis(ax, first: float, last: float, zone: zoneinfo.ZoneInfo) -> None:
    """Span ``[first, last]`` (epoch seconds) on ``ax``'s x axis with ticks labelled to their spacing."""
    if last - first < 1.0:  # one sample: a minute around it
        first, last = first - 30.0, last + 30.0
    ax.set_xlim(dt.datetime.fromtimestamp(first, zone), dt.datetime.fromtimestamp(last, zone))
    locator = mdates.AutoDateLocator(tz=zone, minticks=3, maxticks=8)
    formatter = mdates.AutoDateFormatter(locator, tz=zone)
    # keyed by the locator's unit in days: the finest unit whose labels still differ across the span
    formatter.scaled = {365.0: "%Y", 30.0: "%Y-%m", 1.0: "%b %d",
                        1 / 24: "%H:%M" if last - first < 86400 else "%a %H:%M",
                        1 / 1440: "%H:%M", 1 / 86400: "%H:%M:%S", 1 / 86_400_000_000: "%H:%M:%S.%f"}
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(formatter)


def to_png(fig) -> bytes:
    """Render ``fig`` as PNG bytes and free it."""
    try:
        out = io.BytesIO()
        fig.savefig(out, format="png")
        return out.getvalue()
    finally:
        plt.close(fig)


def charts(channels: list[ChannelSample], tz: str = "UTC", topics: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """The report's charts by name: ``throughput`` and ``depth`` (``topics``: physical topic -> its topic)."""
    return {
        "throughput": to_png(draw(throughput_series(channels, topics), "Throughput per topic", "messages/s", tz)),
        "depth": to_png(draw(depth_series(channels, topics), "Depth per topic and channel", "depth (messages)",
                             tz)),
    }
