"""The pipeline's health over a time window, from health.db: tables and a verdict with its reasons.

:func:`assess` reads the monitor's samples in ``[since, until]`` and returns a
:class:`Health`: one row per topic/channel and per stage, and the reasons that
make the verdict WARN or CRIT:

- CRIT: an nsqd unhealthy or unreachable at the last sample; a process FATAL at
  the last sample; a stage that processed nothing for the stall window while its
  input had depth; a failed chaos run in the window;
- WARN: an nsqd unhealthy at some sample; dead letters; restarts or FATALs;
  a channel whose depth only grew for ``depth_growth_minutes``; an
  end-to-end p99 above ``e2e_p99_max``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DEAD_LETTER_SUFFIX, KEEP_CHANNEL, ReportSpec
from pipeline.observe.healthdb import ChannelSample, HealthDB, ProcessSample, WorkerSample

OK, WARN, CRIT = "OK", "WARN", "CRIT"
LEVELS = {OK: 0, WARN: 1, CRIT: 2}
STALL_SECONDS = 900.0  # a stage idle this long while its input has depth is stalled
STALL_MIN_SAMPLES = 3


@dataclass(frozen=True)
class Reason:
    """Why the verdict is what it is."""

    level: str
    kind: str  # dead_letters, restarts, fatal, depth_growing, e2e_p99, nsqd, stalled, chaos
    text: str


@dataclass
class ChannelRow:
    """A topic (channel ``""``) or channel over the window, summed over the nsqd nodes."""

    topic: str
    channel: str
    depth: int
    max_depth: int
    in_flight: int
    messages: int  # received in the window
    rate: float  # messages/s over the window
    requeued: int
    timed_out: int
    clients: int


@dataclass
class StageRow:
    """A stage over the window, summed over its replicas."""

    stage: str
    replicas: int
    processed: int | None  # None: no metrics sampled from its replicas
    dead_letters: int
    requeued: int
    publish_errors: int
    restarts: int
    p99_s: float | None


@dataclass
class Health:
    """What the report says about one window."""

    since: float
    until: float
    samples: int
    channels: list[ChannelRow] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    dead_letters: list[tuple] = field(default_factory=list)  # (ts, topic, stage, reason, body)

    @property
    def verdict(self) -> str:
        """OK, WARN or CRIT: the worst of the reasons."""
        return max((r.level for r in self.reasons), key=LEVELS.__getitem__, default=OK)


def increase(values: Sequence[float]) -> float:
    """How much a counter grew over ``values``, counting a drop as a restart from zero."""
    total = 0.0
    for before, after in zip(values, values[1:], strict=False):
        total += after - before if after >= before else after
    return total


def counter_total(points: Sequence[tuple[float | None, float]], since: float) -> float:
    """How much one replica's counter grew in a window that starts at ``since``, across its restarts.

    ``points`` are (process start time, counter value) in sample order. A
    sample of a process that started after the one before it, or whose value
    fell, begins a new life of the counter, counted from zero: its whole value
    is added, not the difference. The first sample counts from zero too when
    its process started inside the window, so the work of a replica the
    monitor first saw late (a monitor started or restarted after it) is
    counted. What a replica finished after its last sample and before it
    died is not known, and not counted.
    """
    total = 0.0
    before: tuple[float | None, float] | None = None
    for started, value in points:
        if before is None:
            total += value if started is not None and started >= since else 0.0
        elif value < before[1] or (started is not None and before[0] is not None and started != before[0]):
            total += value
        else:
            total += value - before[1]
        before = (started, value)
    return total


def assess(topology, db: HealthDB, since: float, until: float, spec: ReportSpec | None = None) -> Health:
    """The health of ``topology`` over ``[since, until]`` from the samples in ``db``."""
    channels = db.channels(since, until)
    processes, workers = db.processes(since, until), db.workers(since, until)
    health = Health(since, until, len({c.ts for c in channels}))
    nsqd_rows = db.nsqd_health(since, until)
    health.channels = channel_table(channels, since, {(r[1], r[0]): r[4] for r in nsqd_rows if len(r) > 4})
    health.stages = stage_table(topology, workers, processes, since)
    health.dead_letters = db.dead_letters(since, until)
    growth = (spec.depth_growth_minutes if spec else 60.0) * 60
    p99_max = spec.e2e_p99_max if spec else 60.0
    reasons = [*_nsqd_reasons(nsqd_rows), *_process_reasons(processes),
               *_dead_letter_reasons(topology, channels, health.stages),
               *_growth_reasons(channels, until, growth), *_latency_reasons(health.stages, p99_max),
               *_stall_reasons(topology, channels, workers, until)]
    if spec is not None:
        reasons += _chaos_reasons(topology.var_dir / spec.chaos_result, since, until)
    health.reasons = sorted(reasons, key=lambda r: -LEVELS[r.level])
    return health


def _series(samples: Iterable, key) -> dict:
    grouped: dict = defaultdict(list)
    for s in samples:
        grouped[key(s)].append(s)
    return grouped


def channel_table(channels: list[ChannelSample], since: float = float("-inf"),
                  starts: Mapping[tuple[str, float], float | None] | None = None) -> list[ChannelRow]:
    """One row per topic/channel, figures summed over nsqd nodes.

    ``starts`` maps (nsqd, sample time) to that nsqd's start time, so that its
    counters are counted from zero when it started inside the window.
    """
    node_times = {node: sorted({c.ts for c in s}) for node, s in _series(channels, lambda c: c.nsqd).items()}
    started = starts or {}
    rows = []
    for (topic, channel), samples in sorted(_series(channels, lambda c: (c.topic, c.channel)).items()):
        per_node = _series(samples, lambda c: c.nsqd)
        last = [s[-1] for s in per_node.values()]
        grown = {attr: [_nsqd_growth(s, attr, since, started, node_times[node]) for node, s in per_node.items()]
                 for attr in ("messages", "requeue", "timeout")}
        messages = sum(g for g, _ in grown["messages"])
        span = max(s[-1].ts for s in per_node.values()) - min(begin for _, begin in grown["messages"])
        by_ts = _series(samples, lambda c: c.ts)
        rows.append(ChannelRow(
            topic, channel, sum(c.depth for c in last), max(sum(c.depth for c in g) for g in by_ts.values()),
            sum(c.in_flight for c in last), int(messages), messages / span if span > 0 else 0.0,
            int(sum(g for g, _ in grown["requeue"])), int(sum(g for g, _ in grown["timeout"])),
            sum(c.clients for c in last)))
    return rows


def _nsqd_growth(samples: list[ChannelSample], attr: str, since: float,
                 starts: Mapping[tuple[str, float], float | None], node_times: list[float]) -> tuple[float, float]:
    """How much an nsqd counter of one topic or channel on one node grew in the window, and from when.

    From zero when the nsqd started inside the window, or when the topic or
    channel appeared after the node's first sample (created between two samples).
    """
    points = [(starts.get((c.nsqd, c.ts)), float(getattr(c, attr))) for c in samples]
    total, begin, first = counter_total(points, since), samples[0].ts, points[0][0]
    if first is not None and first >= since:
        begin = first
    elif samples[0].ts > node_times[0]:
        total += points[0][1]
        begin = max(t for t in node_times if t < samples[0].ts)
    return total, begin


def restarts_by_process(processes: list[ProcessSample]) -> dict[str, int]:
    """Restarts seen per process (``group:name``): each change from one live pid to another."""
    counts: dict[str, int] = {}
    for name, samples in _series(processes, lambda p: f"{p.grp}:{p.name}").items():
        pids = [p.pid for p in samples if p.pid]
        counts[name] = sum(1 for a, b in zip(pids, pids[1:], strict=False) if a != b)
    return counts


def stage_table(topology, workers: list[WorkerSample], processes: list[ProcessSample],
                since: float = float("-inf")) -> list[StageRow]:
    """One row per stage of the topology, its counters summed over replicas and their restarts since ``since``."""
    restarts = restarts_by_process(processes)
    per_replica = _series(workers, lambda w: (w.stage, w.replica))
    rows = []
    for name, stage in topology.stages.items():
        series = [[w for w in per_replica.get((name, k), []) if w.up] for k in range(stage.replicas)]
        processed = _growth(series, "finished", since) if any(series) else None
        restarted = sum(n for p, n in restarts.items() if p.startswith(f"{name}:"))
        rows.append(StageRow(name, stage.replicas, processed, _growth(series, "dead_lettered", since),
                             _growth(series, "requeued", since), _growth(series, "publish_errors", since),
                             restarted, p99_of_buckets(_bucket_increase(series, since))))
    return rows


def _growth(series: list[list[WorkerSample]], attr: str, since: float) -> int:
    """How much the counter ``attr`` grew over the window, summed over replicas and their restarts."""
    return round(sum(counter_total([(w.started, getattr(w, attr)) for w in s], since) for s in series))


def _bucket_increase(series: list[list[WorkerSample]], since: float) -> list[tuple[float, float]]:
    """The e2e histogram of the window: each bucket's growth, summed over replicas and their restarts."""
    total: dict[float, float] = defaultdict(float)
    for samples in series:
        counts = [(w.started, dict(w.buckets())) for w in samples]
        for le in {le for _, buckets in counts for le in buckets}:
            total[le] += counter_total([(started, buckets.get(le, 0.0)) for started, buckets in counts], since)
    return sorted(total.items())


def p99_of_buckets(buckets: list[tuple[float, float]], q: float = 0.99) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound of the bucket that holds it)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    for le, count in buckets:
        if count >= target:
            return le
    return buckets[-1][0]


def _nsqd_reasons(rows: list[tuple]) -> list[Reason]:
    reasons = []
    for node, samples in _series(rows, lambda r: r[1]).items():
        bad = [r for r in samples if r[3] != "OK"]
        if samples[-1][3] != "OK":
            reasons.append(Reason(CRIT, "nsqd", f"nsqd {node} is {samples[-1][3]} (last sample)"))
        elif bad:
            reasons.append(Reason(WARN, "nsqd", f"nsqd {node} was unhealthy in {len(bad)} of {len(samples)} samples"
                                                f" ({bad[-1][3]})"))
    return reasons


def _process_reasons(processes: list[ProcessSample]) -> list[Reason]:
    reasons = []
    restarts = {p: n for p, n in restarts_by_process(processes).items() if n}
    if restarts:
        listed = ", ".join(f"{p} ({n})" for p, n in sorted(restarts.items()))
        reasons.append(Reason(WARN, "restarts", f"{sum(restarts.values())} process restart(s): {listed}"))
    for name, samples in _series(processes, lambda p: f"{p.grp}:{p.name}").items():
        if samples[-1].state == "FATAL":
            reasons.append(Reason(CRIT, "fatal", f"{name} is FATAL (last sample)"))
        elif any(p.state == "FATAL" for p in samples):
            reasons.append(Reason(WARN, "fatal", f"{name} was FATAL during the window"))
    return reasons


def _dead_letter_reasons(topology, channels: list[ChannelSample], stages: list[StageRow]) -> list[Reason]:
    dead_topics = {topology.dead_letter_topic(name): name for name in topology.stages}
    counts: dict[str, int] = {}
    first_ts = channels[0].ts if channels else 0.0
    for (_node, topic), samples in _series([c for c in channels if c.channel == "" and c.topic in dead_topics],
                                          lambda c: (c.nsqd, c.topic)).items():
        grown = increase([c.messages for c in samples])
        if samples[0].ts > first_ts:  # the topic appeared during the window: all of its messages are new
            grown += samples[0].messages
        counts[topic] = counts.get(topic, 0) + int(grown)
    for row in stages:  # the workers' own count, when their metrics were sampled and nsqd's missed some
        topic = topology.dead_letter_topic(row.stage)
        counts[topic] = max(counts.get(topic, 0), row.dead_letters)
    return [Reason(WARN, "dead_letters", f"{n} dead letter(s) on {topic} (stage {dead_topics[topic]})")
            for topic, n in sorted(counts.items()) if n]


def _growth_reasons(channels: list[ChannelSample], until: float, growth_s: float) -> list[Reason]:
    reasons = []
    # keep channels hold what no stage reads: they grow by design, bounded by the monitor
    consumed = [c for c in channels if c.channel and c.channel != KEEP_CHANNEL
                and not c.topic.endswith(DEAD_LETTER_SUFFIX)]
    for (topic, channel), samples in _series(consumed, lambda c: (c.topic, c.channel)).items():
        depth_at = {ts: sum(c.depth for c in g) for ts, g in _series(samples, lambda c: c.ts).items()}
        recent = [(ts, d) for ts, d in sorted(depth_at.items()) if ts >= until - growth_s]
        older = [ts for ts in depth_at if ts < until - growth_s]
        if not older or len(recent) < 2:
            continue  # not sampled long enough to tell
        depths = [d for _, d in recent]
        if depths[-1] > depths[0] and all(b >= a for a, b in zip(depths, depths[1:], strict=False)):
            reasons.append(Reason(WARN, "depth_growing", f"depth of {topic}/{channel} grew for "
                                  f"{growth_s / 60:g} min without falling ({depths[0]} -> {depths[-1]})"))
    return reasons


def _latency_reasons(stages: list[StageRow], p99_max: float) -> list[Reason]:
    return [Reason(WARN, "e2e_p99", f"stage {s.stage}: end-to-end p99 {s.p99_s:g} s is above {p99_max:g} s")
            for s in stages if s.p99_s is not None and s.p99_s > p99_max]


def _stall_reasons(topology, channels: list[ChannelSample], workers: list[WorkerSample],
                   until: float) -> list[Reason]:
    reasons = []
    for name, stage in topology.stages.items():
        inputs = set(topology.physical_topics(stage.input))
        mine_in = [c for c in channels if c.topic in inputs and c.channel == stage.channel]
        times = sorted({c.ts for c in mine_in})
        if len(times) < STALL_MIN_SAMPLES:
            continue
        start = min(until - STALL_SECONDS, times[-STALL_MIN_SAMPLES])  # sparse samples: the last few
        recent = [c for c in mine_in if c.ts >= start]
        depth_at = {ts: sum(c.depth for c in g) for ts, g in _series(recent, lambda c: c.ts).items()}
        if len(depth_at) < STALL_MIN_SAMPLES or min(depth_at.values()) == 0:
            continue
        mine = [w for w in workers if w.stage == name and w.ts >= start and w.up]
        depths = [d for _, d in sorted(depth_at.items())]
        if mine:  # the replicas' own count of finished messages
            done = sum(increase([w.finished for w in s]) for s in _series(mine, lambda w: w.replica).values())
        else:  # consumed = what entered the channel minus what is still queued or in flight
            nodes = _series(recent, lambda c: c.nsqd).values()
            done = sum(increase([c.messages for c in s]) - (s[-1].depth - s[0].depth)
                       - (s[-1].in_flight - s[0].in_flight) for s in nodes)
        if done <= 0:
            reasons.append(Reason(CRIT, "stalled", f"stage {name} processed nothing in the last "
                                  f"{(until - start) / 60:g} min while its input had depth {depths[-1]}"))
    return reasons


def _chaos_reasons(path: Path, since: float, until: float) -> list[Reason]:
    """A chaos run's result file: ``{"ok": bool, "finished_at": epoch seconds, "scenario": ..., "failures": [...]}``."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    finished = float(result.get("finished_at", 0))
    if result.get("ok", True) or not since <= finished <= until:
        return []
    detail = "; ".join(map(str, result.get("failures") or [])) or "no detail"
    return [Reason(CRIT, "chaos", f"chaos run {result.get('scenario', '?')} failed: {detail}")]
