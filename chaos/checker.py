"""The checker: compares the producer's journal with what the sinks saw, Jepsen-style.

Separate from the monkey: it reads only the journal, the arrivals and the
recovery observations, so it can be run again on a finished run's folder.

- ``acked``: ids whose publish nsqd acknowledged;
- ``lost``: acked, but neither delivered (prime/non_prime) nor dead-lettered;
- ``unexpected``: arrived but never sent;
- ``duplicated``: ids delivered more than once (at-least-once allows it); on replicated topics (``copies``
  above 1: each message on that many nsqd nodes, and the sinks read every node), more times than the copies,
  so a copy is not a duplicate; one the pipeline published again while a copy was lost with a killed nsqd
  goes uncounted;
- ``dead_lettered``: ids on the dead-letter topic; ``poison_not_dead_lettered``:
  poison records that came out anywhere else or nowhere;
- ``crash_not_dead_lettered``: records that kill their worker (the workload's ``crashes``) without a dead
  letter whose reason names the worker deaths and their cause (``worker died 2 times while processing it
  (last: SIGSEGV)``); ``restarts_per_crash``: worker restarts over the crash records (filled in by the run);
- ``misclassified``: a number on ``prime`` that is not prime, or the reverse;
- ``mismatched``: (the ticks pipeline, :mod:`chaos.market_check`) features or signals that differ from the
  offline reference;
- ``running``: seconds from a worker kill until supervisord reports its successor RUNNING (after startsecs);
- ``recovery``: seconds from a worker kill until its successor is subscribed with RDY > 0 to every nsqd that is
  up (:func:`consumed_at`: a node SIGSTOPped, or killed and not yet RUNNING again, is not waited for);
- ``recovery_clear``: the same over the kills with no broker or network fault in force (nsqd or nsqlookupd
  not RUNNING, nsqd stopped, a toxic, the proxy down) from the kill until the successor consumed: the
  workers' own recovery, which those faults would otherwise hide behind their duration.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

from .faults import Kill
from .sink import Arrival
from .workload import Journal


def is_prime(n: int) -> bool:
    """Trial division: the checker's reference, independent of the stage's numba kernel."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


#: What the worker deaths of each kind of crash record are reported as (chaos.crashing:classify).
CRASH_CAUSES = {"exit": "exit status 1", "segv": "SIGSEGV"}
_CRASH_REASON = re.compile(r"worker died (?:once|\d+ times) while processing it \(last: (.+)\)")


@dataclass
class Report:
    """The checker's findings for one run."""

    acked: int = 0
    sent: int = 0
    arrived: int = 0
    delivered: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicated: int = 0
    dead_lettered: int = 0
    poison: int = 0
    poison_not_dead_lettered: int = 0
    misclassified: int = 0
    mismatched: int = 0
    crash_records: int = 0
    crash_not_dead_lettered: int = 0
    restarts_per_crash: float | None = None
    kills: int = 0
    point_kills: int = 0
    fatal: int = 0
    recovered: int = 0
    running_p50: float | None = None
    running_p99: float | None = None
    recovery_p50: float | None = None
    recovery_p99: float | None = None
    recovered_clear: int = 0
    recovery_clear_p50: float | None = None
    recovery_clear_p99: float | None = None
    lost_ids: list[str] = field(default_factory=list)
    #: One entry per kill: [process, kill time (epoch s), seconds to RUNNING, seconds to consuming] (None: never).
    recovery_log: list[list] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lost_ids"] = data["lost_ids"][:20]
        return data


def check(journal: Journal, arrivals: list[Arrival], dead_topic: str, *, kills: list[Kill] = (),
          first_running: dict[int, tuple[str, float]] | None = None,
          consuming: dict[int, float] | None = None, disturbances: list[list] = (),
          started: dict[int, tuple[str, float]] | None = None, copies: int = 1) -> Report:
    """Compare ``journal`` with ``arrivals``; measure recovery from ``kills`` (see :func:`add_recovery`).

    ``copies``: the outputs' replication (an id may arrive that many times before it is a duplicate).
    """
    report = Report(acked=len(journal.acked), sent=len(journal.sent), arrived=len(arrivals))
    delivered = Counter(a.id for a in arrivals if a.topic != dead_topic)
    dead = {a.id for a in arrivals if a.topic == dead_topic}
    report.delivered = len(delivered)
    report.dead_lettered = len(dead)
    report.duplicated = sum(1 for count in delivered.values() if count > copies)
    lost = sorted(journal.acked - delivered.keys() - dead)
    report.lost, report.lost_ids = len(lost), lost
    report.unexpected = len((delivered.keys() | dead) - journal.sent.keys())
    poison = {i for i, n in journal.sent.items() if not isinstance(n, int) and i in journal.acked}
    report.poison = len(poison)
    report.poison_not_dead_lettered = len(poison - dead)
    crashes = {i: n["crash"] for i, n in journal.sent.items() if isinstance(n, dict) and i in journal.acked}
    named = {a.id for a in arrivals if a.topic == dead_topic and a.id in crashes
             and (found := _CRASH_REASON.fullmatch(a.reason or "")) and found.group(1) == CRASH_CAUSES[crashes[a.id]]}
    report.crash_records, report.crash_not_dead_lettered = len(crashes), len(crashes.keys() - named)
    report.misclassified = sum(1 for a in arrivals if a.topic != dead_topic and isinstance(a.number, int)
                               and a.prime is not None and a.prime != is_prime(a.number))
    return add_recovery(report, kills=kills, first_running=first_running, consuming=consuming,
                        disturbances=disturbances, started=started)


def add_recovery(report: Report, *, kills: list[Kill] = (), first_running: dict[int, tuple[str, float]] | None = None,
                 consuming: dict[int, float] | None = None, disturbances: list[list] = (),
                 started: dict[int, tuple[str, float]] | None = None) -> Report:
    """Fill in ``report``'s kills and recovery figures (see :func:`recovery_times`); return it.

    ``disturbances``: [start, end] (end None: until now) of the broker and network faults.
    """
    running, recoveries = recovery_times(kills, first_running or {}, consuming or {}, log=report.recovery_log,
                                         started=started)
    report.kills, report.recovered = len(kills), len(recoveries)
    clear = [entry[3] for entry in report.recovery_log
             if entry[3] is not None and not _disturbed(entry[1], entry[1] + entry[3], disturbances)]
    report.recovered_clear = len(clear)
    if clear:
        report.recovery_clear_p50 = round(statistics.median(clear), 3)
        report.recovery_clear_p99 = round(_percentile(clear, 0.99), 3)
    if running:
        report.running_p50 = round(statistics.median(running), 3)
        report.running_p99 = round(_percentile(running, 0.99), 3)
    if recoveries:
        report.recovery_p50 = round(statistics.median(recoveries), 3)
        report.recovery_p99 = round(_percentile(recoveries, 0.99), 3)
    return report


def recovery_times(kills: list[Kill], first_running: dict[int, tuple[str, float]],
                   consuming: dict[int, float], log: list | None = None,
                   started: dict[int, tuple[str, float]] | None = None) -> tuple[list[float], list[float]]:
    """Seconds from each worker kill to its successor's RUNNING, and to its successor consuming again.

    The successor is the first process of the same name seen after the kill: in ``started`` (pid -> (name,
    first seen STARTING or RUNNING)) when given, else in ``first_running``. A worker consumes before
    supervisord calls it RUNNING (startsecs), so a successor killed in between was never RUNNING: it is still
    the one whose consuming ends the recovery. A kill whose successor died before it consumed has no time
    (``recovered`` < ``kills``). ``log`` gets one ``[name, kill time, to RUNNING, to consuming]`` per kill
    (None where there is no time).
    """
    running, consumed = [], []
    for kill in kills:
        successors = sorted((t, pid) for pid, (name, t) in (started or first_running).items()
                            if name == kill.name and pid != kill.pid and t >= kill.t - 0.5)
        to_running = to_consuming = None
        if successors:
            _, pid = successors[0]
            if pid in first_running:
                to_running = round(max(0.0, first_running[pid][1] - kill.t), 3)
                running.append(to_running)
            if pid in consuming:
                to_consuming = round(max(0.0, consuming[pid] - kill.t), 3)
                consumed.append(to_consuming)
        if log is not None:
            log.append([kill.name, round(kill.t, 3), to_running, to_consuming])
    return running, consumed


def consumed_at(subscribed: dict[str, float], nodes: list[str], outages: dict[str, list[list]],
                until: float | None = None) -> float | None:
    """When a process began consuming: the first moment it was subscribed to every node of ``nodes`` that was
    up, and to at least one; None when that never happened (before ``until``, when it was killed).

    ``subscribed``: node -> the process's first subscription to it (RDY > 0); ``outages``: node -> [start, end]
    (end None: until now) of the times it could not be subscribed to (SIGSTOPped, or killed until RUNNING
    again). The moment is one of the subscriptions, or the start of an outage of the node still missing.
    """
    if not subscribed:
        return None
    first = min(subscribed.values())
    moments = sorted({*subscribed.values(), *(s for windows in outages.values() for s, _ in windows if s > first)})
    for t in (t for t in moments if until is None or t <= until):
        if t >= first and all(subscribed.get(node, float("inf")) <= t or _down(outages.get(node, ()), t)
                              for node in nodes):
            return t
    return None


def node_outages(kills: list[Kill], down: dict[str, list[list]], stops: dict[str, list[list]]) -> dict[str, list[list]]:
    """Each nsqd's outages: from each kill (SIGTERM too: nsqd stops listening at once, though supervisord calls
    it RUNNING until it exited) until supervisord saw it RUNNING again, the times supervisord saw it otherwise
    (``down``) and the times it was SIGSTOPped (``stops``); by program name (``nsqd-n0``)."""
    outages = {name: [list(w) for w in windows] for name, windows in down.items()}
    for name, windows in stops.items():
        outages.setdefault(name, []).extend(list(w) for w in windows)
    for kill in kills:
        name = kill.name.partition(":")[0]
        after = sorted((w for w in down.get(name, ()) if w[0] >= kill.t - 0.5), key=lambda w: w[0])
        outages.setdefault(name, []).append([kill.t, after[0][1] if after else kill.t])
    return outages


def _down(windows, t: float) -> bool:
    return any(s <= t and (e is None or t < e) for s, e in windows)


def _disturbed(start: float, end: float, disturbances: list[list]) -> bool:
    """Tell whether any disturbance overlaps [start, end]."""
    return any(s <= end and (e is None or e >= start) for s, e in disturbances)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
