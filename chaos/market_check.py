"""The checker of the ticks pipeline: features and signals against the offline reference, Jepsen-style.

The producer's journal holds every tick it sent, in order; the offline
reference (:mod:`chaos.market_reference`, written from the formulas, not from
the stages) turns them into the features and signals a run without faults
produces. Compared with what the sinks saw:

- ``lost``: a feature of an acked tick, or a signal the reference emits on one,
  that never arrived (and whose tick was not dead-lettered);
- ``unexpected``: a feature of a tick never sent, or a signal the reference
  does not emit;
- ``duplicated``: feature and signal ids that arrived more than once (more than ``copies`` times on
  replicated topics, see :mod:`chaos.checker`);
- ``mismatched``: ids whose record differs from the reference (any copy of it:
  a redelivery replayed from a checkpoint must reproduce the same values);
- ``dead_lettered``: ticks or features on a dead-letter topic (none expected).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping

from .checker import Report, add_recovery
from .market_reference import reference_features, reference_signals
from .sink import Arrival
from .workload import Journal

FLOATS = ("price", "size", "log_return", "ema_fast", "ema_slow", "mean", "std", "zscore", "vwap", "rv")
EXACT = ("symbol", "seq", "feature_seq")
REL_TOL = ABS_TOL = 1e-9


def feature_differs(got: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    """Tell whether a feature record differs from the reference's (floats to 1e-9)."""
    if any(got.get(name) != expected[name] for name in EXACT):
        return True
    return not all(_close(got.get(name), expected[name]) for name in FLOATS)


def signal_differs(got: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    """Tell whether a signal record differs from the reference's."""
    if any(got.get(name) != expected[name] for name in ("source_id", "symbol", "seq", "rule", "signal")):
        return True
    return not _close(got.get("strength"), expected["strength"])


def _close(value: Any, expected: float) -> bool:
    return isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def expected_outputs(journal: Journal, features: Mapping[str, Any],
                     signals: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The reference features and signals of every tick in ``journal``, each keyed by its id.

    ``features`` and ``signals`` are the stages' params (the reference's keyword arguments).
    """
    by_seq = reference_features(journal.sent.values(), **features)
    ordered = sorted(by_seq.values(), key=lambda f: (f["symbol"], f["seq"]))
    return {f["id"]: f for f in ordered}, {s["id"]: s for s in reference_signals(ordered, **signals)}


def check_ticks(journal: Journal, arrivals: Iterable[Arrival], feature_topics: Iterable[str], signal_topic: str,
                dead_topics: Iterable[str], *, features: Mapping[str, Any], signals: Mapping[str, Any],
                copies: int = 1, **recovery) -> Report:
    """Compare the features and signals that arrived with the reference of the journal's ticks.

    ``copies``: the outputs' replication; ``recovery``: ``kills``, ``first_running`` and ``consuming``, as
    :func:`chaos.checker.check` takes them.
    """
    arrivals = list(arrivals)
    want_features, want_signals = expected_outputs(journal, features, signals)
    feature_topics, dead_topics = set(feature_topics), set(dead_topics)
    got: dict[str, dict[str, list[dict]]] = {"features": defaultdict(list), "signals": defaultdict(list)}
    dead = set()
    for a in arrivals:
        if a.topic in dead_topics:
            dead.add(a.id)
        elif a.topic in feature_topics:
            got["features"][a.id].append(a.record or {})
        elif a.topic == signal_topic:
            got["signals"][a.id].append(a.record or {})
    report = Report(acked=len(journal.acked), sent=len(journal.sent), arrived=len(arrivals),
                    dead_lettered=len(dead))
    lost: list[str] = []
    for kind, want, differs in (("features", want_features, feature_differs),
                                ("signals", want_signals, signal_differs)):
        seen = got[kind]
        report.delivered += len(seen)
        report.duplicated += sum(1 for arrived in seen.values() if len(arrived) > copies)
        report.unexpected += sum(1 for i in seen if i not in want)
        report.mismatched += sum(1 for i, copies in seen.items()
                                 if i in want and any(differs(c, want[i]) for c in copies))
        lost += [i for i, record in want.items() if _source(record) in journal.acked and i not in seen
                 and _source(record) not in dead]
    report.lost, report.lost_ids = len(lost), sorted(lost)
    add_recovery(report, **recovery)
    return report


def _source(record: Mapping[str, Any]) -> str:
    """The id of the tick a reference feature or signal comes from."""
    return record.get("source_id", record["id"])
