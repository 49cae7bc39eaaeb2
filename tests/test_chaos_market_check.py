"""The ticks checker's arithmetic: features and signals against the offline reference of the journal."""
from __future__ import annotations

import pytest

from chaos.market_check import check_ticks, expected_outputs, feature_differs
from chaos.sink import Arrival
from chaos.workload import Journal
from producers.ticks import synthetic_ticks

FEATURES = {"ema_fast": 12, "ema_slow": 26, "window": 20}
SIGNALS = {"crossover_band": 0.0005, "z_entry": 2.0, "z_exit": 0.5}
FEATURE_TOPICS = ["features.0", "features.1"]
DEAD = ["ticks.dead", "features.dead"]


@pytest.fixture(scope="module")
def journal() -> Journal:
    ticks = list(synthetic_ticks(4, 800, seed=3, run_id="c"))
    return Journal(sent={t["id"]: t for t in ticks}, acked={t["id"] for t in ticks})


@pytest.fixture(scope="module")
def reference(journal):
    return expected_outputs(journal, FEATURES, SIGNALS)


def _arrivals(features: dict, signals: dict) -> list[Arrival]:
    out = [Arrival(f"features.{hash(f['symbol']) % 2}", i, None, 1, 0.0, None, dict(f)) for i, f in features.items()]
    return out + [Arrival("signals", i, None, 1, 0.0, None, dict(s)) for i, s in signals.items()]


def _check(journal, arrivals):
    return check_ticks(journal, arrivals, FEATURE_TOPICS, "signals", DEAD, features=FEATURES, signals=SIGNALS)


def test_the_reference_itself_passes(journal, reference) -> None:
    features, signals = reference
    assert len(features) == 800 and len(signals) > 10  # the rules fire on this seed
    report = _check(journal, _arrivals(features, signals))
    assert (report.lost, report.unexpected, report.duplicated, report.mismatched) == (0, 0, 0, 0)
    assert report.delivered == len(features) + len(signals)


def test_counts_each_kind_of_anomaly(journal, reference) -> None:
    features, signals = dict(reference[0]), dict(reference[1])
    some_feature, other_feature = list(features)[100], list(features)[200]
    some_signal = list(signals)[3]
    # Given one feature with a value off by 1e-6, one feature and one signal missing,
    # a signal the reference does not emit, and a feature delivered twice (identical copies)
    features[some_feature] = {**features[some_feature], "ema_fast": features[some_feature]["ema_fast"] * (1 + 1e-6)}
    del features[other_feature]
    del signals[some_signal]
    arrivals = _arrivals(features, signals)
    arrivals.append(Arrival("signals", "c-SYM000-1:made_up", None, 1, 0.0, None, {"id": "c-SYM000-1:made_up"}))
    arrivals.append(arrivals[0])
    report = _check(journal, arrivals)
    assert report.mismatched == 1
    assert report.lost == 2 and report.lost_ids == sorted([other_feature, some_signal])
    assert (report.unexpected, report.duplicated) == (1, 1)


def test_a_redelivered_copy_with_other_values_is_mismatched(journal, reference) -> None:
    features, signals = reference
    arrivals = _arrivals(features, signals)
    first = arrivals[0]
    arrivals.append(Arrival(first.topic, first.id, None, 2, 0.0, None, {**first.record, "feature_seq": 99}))
    report = _check(journal, arrivals)
    assert (report.duplicated, report.mismatched, report.lost) == (1, 1, 0)


def test_unacked_ticks_need_not_arrive_and_dead_letters_are_not_lost(journal, reference) -> None:
    features, signals = reference
    # The last tick was sent but never acknowledged; the first one was dead-lettered
    last, first = list(journal.sent)[-1], list(journal.sent)[0]
    partial = Journal(sent=journal.sent, acked=journal.acked - {last})
    kept_features = {i: f for i, f in features.items() if i not in (last, first)}
    kept_signals = {i: s for i, s in signals.items() if s["source_id"] not in (last, first)}
    arrivals = _arrivals(kept_features, kept_signals) + [Arrival("ticks.dead", first, None, 5, 0.0)]
    report = _check(partial, arrivals)
    assert (report.lost, report.dead_lettered, report.unexpected) == (0, 1, 0)


def test_feature_comparison_is_exact_on_keys_and_close_on_floats(reference) -> None:
    feature = next(iter(reference[0].values()))
    assert not feature_differs({**feature, "vwap": feature["vwap"] * (1 + 1e-12)}, feature)
    assert feature_differs({**feature, "seq": feature["seq"] + 1}, feature)
    assert feature_differs({k: v for k, v in feature.items() if k != "rv"}, feature)
