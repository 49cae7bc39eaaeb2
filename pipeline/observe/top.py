"""``pipeline top``: a live table of every stage and channel, refreshed in place (rich.live).

Each refresh takes a :class:`Snapshot` (every nsqd's ``/stats``, each
replica's ``/metrics``, the restarter's restart counts) and
:func:`build_rows` turns two snapshots into one row per channel: the stage
that reads it, rate in (messages into the channel per second), rate out
(messages the stage published per second), depth, in flight, requeues, dead
letters, restarts and the end-to-end p99 latency.
"""
from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from pipeline.observe.health import p99_of_buckets
from pipeline.observe.healthdb import ChannelSample
from pipeline.observe.nsq_exporter import channel_rows, discover_nsqd, fetch_stats
from pipeline.ops.restarter import read_restarts

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ReplicaMetrics:
    """What ``pipeline top`` reads from one replica's ``/metrics``."""

    published: float = 0.0  # messages published to outputs (dead letters excluded)
    e2e_buckets: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Snapshot:
    """Everything one refresh of ``pipeline top`` reads, at time ``ts``."""

    ts: float
    channels: list[ChannelSample]
    replicas: dict[tuple[str, int], ReplicaMetrics]
    restarts: dict[str, int]


@dataclass
class TopRow:
    """One line of the table."""

    stage: str
    topic: str
    channel: str
    replicas: str  # "answering/declared" metrics endpoints, or "-"
    rate_in: float
    rate_out: float | None
    depth: int
    in_flight: int
    requeued: int
    dead_letters: int
    restarts: int
    p99_s: float | None


def read_replica(address: str, dead_topic: str, timeout: float = 1.0) -> ReplicaMetrics | None:
    """Scrape one replica; None when its endpoint does not answer."""
    try:
        text = _LOCAL.open(f"http://{address}/metrics", timeout=timeout).read().decode()
    except OSError:
        return None
    metrics = ReplicaMetrics()
    for family in text_string_to_metric_families(text):
        if family.name == "pipeline_messages_out":
            metrics.published = sum(s.value for s in family.samples
                                    if s.name.endswith("_total") and s.labels.get("topic") != dead_topic)
        elif family.name == "pipeline_e2e_latency_seconds":
            metrics.e2e_buckets = [(float(s.labels["le"]), s.value) for s in family.samples
                                   if s.name.endswith("_bucket")]
    return metrics


def snapshot(topology, clock=time.time) -> Snapshot:
    """Read nsqd, the replicas' metrics and the restart counts now."""
    now = clock()
    channels = []
    for node in discover_nsqd(topology):
        stats = fetch_stats(node)
        if stats:
            channels += channel_rows(now, node, stats)
    replicas = {}
    for name, stage in topology.stages.items():
        if stage.metrics_port:
            host = "127.0.0.1" if stage.metrics_host in ("0.0.0.0", "::") else stage.metrics_host
            for k in range(stage.replicas):
                found = read_replica(f"{host}:{stage.metrics_port + k}", topology.dead_letter_topic(name))
                if found is not None:
                    replicas[(name, k)] = found
    restarts: dict[str, int] = defaultdict(int)
    for process, info in read_restarts(topology.var_dir / "log" / "restarts.json").items():
        restarts[process.split(":")[0]] += int(info.get("restarts", 0))
    return Snapshot(now, channels, replicas, dict(restarts))


def _sum_by_channel(channels: list[ChannelSample]) -> dict[tuple[str, str], ChannelSample]:
    """Figures per (topic, channel), summed over nsqd nodes (kept as ChannelSample)."""
    summed: dict[tuple[str, str], ChannelSample] = {}
    for c in channels:
        key = (c.topic, c.channel)
        old = summed.get(key)
        if old is None:
            summed[key] = c
            continue
        summed[key] = ChannelSample(c.ts, "*", c.topic, c.channel, old.depth + c.depth,
                                    old.backend_depth + c.backend_depth, old.in_flight + c.in_flight,
                                    old.deferred + c.deferred, old.requeue + c.requeue, old.timeout + c.timeout,
                                    old.messages + c.messages, old.clients + c.clients, old.e2e_p99)
    return summed


def build_rows(topology, before: Snapshot, after: Snapshot) -> list[TopRow]:
    """One row per channel (stage channels first), rates from the two snapshots."""
    dt = max(after.ts - before.ts, 1e-9)
    old, new = _sum_by_channel(before.channels), _sum_by_channel(after.channels)
    owners = {(t, s.channel): n for n, s in topology.stages.items() for t in topology.physical_topics(s.input)}
    rows = []
    for (topic, channel), c in sorted(new.items(), key=lambda kv: (kv[0] not in owners, kv[0])):
        if not channel:
            continue
        stage = owners.get((topic, channel), "-")
        prev = old.get((topic, channel), c)
        replicas, rate_out, dead, restarts, p99 = _stage_figures(topology, stage, before, after, dt, new)
        rows.append(TopRow(stage, topic, channel, replicas, max(c.messages - prev.messages, 0) / dt, rate_out,
                           c.depth, c.in_flight, c.requeue, dead, restarts, p99))
    return rows


def _stage_figures(topology, stage: str, before: Snapshot, after: Snapshot, dt: float, channels) -> tuple:
    """(replicas, rate out, dead letters, restarts, p99) of a stage; dashes for a channel no stage reads."""
    if stage == "-":
        return "-", None, 0, 0, None
    spec = topology.stage(stage)
    mine = [k for k in range(spec.replicas) if (stage, k) in after.replicas]
    published = sum(after.replicas[(stage, k)].published - before.replicas.get((stage, k), after.replicas[(stage, k)])
                    .published for k in mine)
    buckets: dict[float, float] = defaultdict(float)
    for k in mine:
        for le, count in after.replicas[(stage, k)].e2e_buckets:
            buckets[le] += count
    dead = channels.get((topology.dead_letter_topic(stage), ""))
    replicas = f"{len(mine)}/{spec.replicas}" if spec.metrics_port else "-"
    return (replicas, max(published, 0) / dt if mine else None, dead.messages if dead else 0,
            after.restarts.get(stage, 0), p99_of_buckets(sorted(buckets.items())))


COLUMNS = ("stage", "topic/channel", "replicas", "in/s", "out/s", "depth", "in flight", "requeued", "dead",
           "restarts", "p99")


def render(rows: list[TopRow], title: str = "pipeline top") -> Table:
    """The rows as a rich table; rows with a growing backlog or dead letters stand out."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("stage", "topic/channel") else "right")
    for r in rows:
        out = "-" if r.rate_out is None else f"{r.rate_out:,.1f}"
        p99 = "-" if r.p99_s is None else f"{r.p99_s:g} s"
        style = "red" if r.dead_letters or r.restarts else None
        table.add_row(r.stage, f"{r.topic}/{r.channel}", r.replicas, f"{r.rate_in:,.1f}", out, f"{r.depth:,}",
                      f"{r.in_flight:,}", f"{r.requeued:,}", f"{r.dead_letters:,}", str(r.restarts), p99, style=style)
    return table


def run(topology, console, interval: float = 2.0, once: bool = False) -> None:
    """Show the table: once (two snapshots ``interval`` apart), or refreshed until Ctrl-C."""
    from rich.live import Live
    before = snapshot(topology)
    time.sleep(interval)  # rates are differences between two snapshots
    after = snapshot(topology)
    if once:
        console.print(render(build_rows(topology, before, after)))
        return
    with Live(render(build_rows(topology, before, after)), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            before, after = after, snapshot(topology)
            live.update(render(build_rows(topology, before, after)))
