"""Tests for the market-data stages ``consumers.features`` and ``consumers.signals``.

Both are checked against the independent offline reference in
``chaos.market_reference`` on seeded synthetic ticks (geometric Brownian motion on
a price grid, so prices repeat as real ticks do), across batch splits, across
a snapshot/restore, and with bad records mixed in.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from consumers.features import FEATURE_FIELDS, Features
from consumers.signals import Signals
from chaos.market_reference import reference_features, reference_signals
from pipeline.errors import HandlerLoadError
from pipeline.stage import Batch, StageContext, load_handler

TOLERANCE = 1e-9  # absolute plus relative
TICK_FIELDS = ("id", "ts", "symbol", "seq", "feature_seq", "price", "size")
SMALL_WINDOW = {"ema_fast": 2.5, "ema_slow": 4, "window": 3}
EVERY_SIGNAL = {("ema_crossover", "BUY"), ("ema_crossover", "SELL"),
                ("zscore", "BUY"), ("zscore", "SELL"), ("zscore", "FLAT")}


# ---------------------------------------------------------------------------
# Synthetic ticks and helpers
# ---------------------------------------------------------------------------

def make_ticks(n_ticks: int = 3000, n_symbols: int = 8, seed: int = 20240601) -> list[dict]:
    """Return seeded GBM ticks for ``n_symbols`` symbols, interleaved at random, seq from 1 per symbol."""
    rng = np.random.default_rng(seed)
    symbols = [f"SYM{k}" for k in range(n_symbols)]
    prices = rng.uniform(5.0, 500.0, n_symbols)
    sigmas = rng.uniform(0.001, 0.01, n_symbols)  # per-tick volatility
    seqs = [0] * n_symbols
    ticks = []
    for i in range(n_ticks):
        k = int(rng.integers(n_symbols))
        if rng.random() > 0.25:  # else the price is unchanged, as on a quiet book
            step = -0.5 * sigmas[k] ** 2 + sigmas[k] * rng.standard_normal()
            prices[k] = max(0.01, round(prices[k] * math.exp(step), 2))
        # Sizes: ints, floats, and an occasional zero.
        size = int(rng.integers(0, 300)) if i % 2 else round(float(rng.exponential(50.0)), 3)
        seqs[k] += 1
        ticks.append({"id": f"{symbols[k]}-{seqs[k]}", "ts": 1_700_000_000_000_000_000 + 1000 * i,
                      "symbol": symbols[k], "seq": seqs[k], "price": float(prices[k]), "size": size})
    return ticks


def context(**params) -> StageContext:
    """Return a stage context carrying ``params``."""
    return StageContext(stage="test", replica=0, var_dir=Path("var"), params=params)


def run(stage, records: list, batch_size: int | None = None) -> tuple[list[dict], dict[int, str]]:
    """Feed ``records`` to ``stage`` in batches; return everything emitted and the rejections by record index."""
    size = batch_size or max(1, len(records))
    emitted: list[dict] = []
    rejected: dict[int, str] = {}
    for start in range(0, len(records), size):
        batch = Batch(records[start:start + size])
        (records_out,) = stage(batch).values()
        emitted += records_out
        rejected.update({start + i: reason for i, reason in batch.rejected.items()})
    return emitted, rejected


def assert_features_match(got: list[dict], expected: dict[tuple[str, int], dict]) -> None:
    """Assert one output per expected (symbol, seq), equal within TOLERANCE, in per-symbol seq order."""
    assert sorted((f["symbol"], f["seq"]) for f in got) == sorted(expected)
    for symbol in {f["symbol"] for f in got}:
        seqs = [f["seq"] for f in got if f["symbol"] == symbol]
        assert seqs == sorted(seqs)
    wrong = []
    for f in got:
        want = expected[(f["symbol"], f["seq"])]
        assert list(f) == [*TICK_FIELDS, *FEATURE_FIELDS]
        assert {name: f[name] for name in TICK_FIELDS} == {name: want[name] for name in TICK_FIELDS}
        for name in FEATURE_FIELDS:
            if type(f[name]) is not float or not abs(f[name] - want[name]) <= TOLERANCE * (1 + abs(want[name])):
                wrong.append((f["symbol"], f["seq"], name, f[name], want[name]))
    assert wrong == [], f"{len(wrong)} features differ from the reference, first: {wrong[:5]}"


@pytest.fixture(scope="module")
def ticks() -> list[dict]:
    return make_ticks()


@pytest.fixture(scope="module")
def expected(ticks) -> dict:
    return reference_features(ticks)


@pytest.fixture(scope="module")
def features(ticks) -> list[dict]:
    """The stage's features of ``ticks`` with default params (batches of 256)."""
    return run(Features(context()), ticks, 256)[0]


# ---------------------------------------------------------------------------
# Features against the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 7, 256, None], ids=["1", "7", "256", "all"])
def test_features_match_reference_for_any_batch_split(ticks, expected, batch_size):
    got, rejected = run(Features(context()), ticks, batch_size)
    assert rejected == {}
    assert_features_match(got, expected)


def test_features_match_reference_with_a_short_window_and_fractional_span():
    # A window of 3 wraps the ring every few ticks and often holds equal prices.
    ticks = make_ticks(1500, seed=3)
    got, _ = run(Features(context(**SMALL_WINDOW)), ticks, 64)
    assert_features_match(got, reference_features(ticks, **SMALL_WINDOW))
    assert any(f["std"] == 0.0 for f in got[10:]), "the data should include windows of equal prices"


def test_features_match_reference_past_the_initial_capacity_of_symbols():
    ticks = make_ticks(2000, n_symbols=40, seed=11)
    got, _ = run(Features(context(window=20)), ticks, 100)
    assert_features_match(got, reference_features(ticks, window=20))


def test_equal_prices_have_std_exactly_zero_not_rounding_noise():
    # Regression: mean(0.1, 0.1, 0.1) is not 0.1 in floats, so a naive std is
    # ~1e-17 and the zscore (p - mean) / std is noise of order 1.
    ticks = [{"id": str(s), "ts": s, "symbol": "A", "seq": s, "price": 0.1, "size": 0} for s in range(1, 6)]
    got, _ = run(Features(context(window=3)), ticks)
    assert [(f["std"], f["zscore"], f["mean"], f["vwap"], f["rv"]) for f in got] == [(0.0, 0.0, 0.1, 0.1, 0.0)] * 5


def test_a_window_without_volume_has_the_mean_price_as_vwap():
    prices, sizes = [1.0, 2.0, 3.0, 4.0], [5, 0, 0, 0.0]
    ticks = [{"id": str(s), "ts": s, "symbol": "A", "seq": s, "price": p, "size": q}
             for s, (p, q) in enumerate(zip(prices, sizes), 1)]
    got, _ = run(Features(context(window=3)), ticks)
    assert [f["vwap"] for f in got] == [1.0, 1.0, 1.0, 3.0]


def test_output_records_are_new_dicts_with_float_price_and_size():
    tick = {"id": "a-1", "ts": 5, "symbol": "A", "seq": 1, "price": 10, "size": 3, "venue": "X"}
    before = dict(tick)
    (out,), _ = run(Features(context()), [tick])
    assert tick == before
    assert out == {"id": "a-1", "ts": 5, "symbol": "A", "seq": 1, "feature_seq": 1, "price": 10.0, "size": 3.0,
                   "log_return": 0.0, "ema_fast": 10.0, "ema_slow": 10.0, "mean": 10.0, "std": 0.0,
                   "zscore": 0.0, "vwap": 10.0, "rv": 0.0}
    assert type(out["price"]) is float and type(out["size"]) is float
    # numpy scalars, from a caller feeding generated data directly, are numbers too
    (out,), rejected = run(Features(context()), [dict(tick, price=np.float64(9.5), size=np.float64(2.0))])
    assert rejected == {} and type(out["price"]) is float and out["price"] == 9.5


# ---------------------------------------------------------------------------
# Features: snapshot and restore
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [3, 1001])
def test_features_restored_into_a_new_instance_continue_bit_identically(ticks, cut):
    # Given an uninterrupted run, and a run snapshotted at `cut` (at 3 most
    # symbols have not been seen yet, so the restored stage must add them)
    whole, _ = run(Features(context()), ticks, 7)
    first = Features(context())
    before, _ = run(first, ticks[:cut], 7)
    data = first.snapshot()

    # When a new instance, which has already seen other ticks, restores it
    second = Features(context())
    run(second, make_ticks(50, n_symbols=3, seed=99))
    second.restore(data)
    assert second.snapshot() == data
    after, _ = run(second, ticks[cut:], 7)

    # Then its outputs equal the uninterrupted run's exactly
    assert before + after == whole


def test_features_restore_refuses_other_params_and_garbage_and_keeps_its_state(ticks):
    stage = Features(context())
    run(stage, ticks[:500])
    state = stage.snapshot()
    with pytest.raises(ValueError, match="params"):
        stage.restore(Features(context(window=20)).snapshot())
    with pytest.raises(ValueError, match="cannot restore snapshot"):
        stage.restore(b"\x93garbage")
    with pytest.raises(ValueError, match="format"):
        stage.restore(Signals(context()).snapshot())
    assert stage.snapshot() == state


# ---------------------------------------------------------------------------
# Features: bad ticks
# ---------------------------------------------------------------------------

def _without(key):
    return lambda tick: {k: v for k, v in tick.items() if k != key}


def _with(key, value):
    return lambda tick: {**tick, key: value}


BAD_TICKS = {
    "missing symbol": (_without("symbol"), "'symbol' is missing"),
    "symbol not a string": (_with("symbol", 42), "'symbol' must be a non-empty string"),
    "empty symbol": (_with("symbol", ""), "'symbol' must be a non-empty string"),
    "negative price": (_with("price", -101.5), "'price' must be a finite number > 0"),
    "zero price": (_with("price", 0), "'price' must be a finite number > 0"),
    "NaN price": (_with("price", float("nan")), "'price' must be a finite number > 0, got float nan"),
    "infinite price": (_with("price", float("inf")), "'price' must be a finite number > 0"),
    "string price": (_with("price", "101.5"), "'price' must be a finite number > 0, got str"),
    "bool price": (_with("price", True), "'price' must be a finite number > 0, got bool True"),
    "missing price": (_without("price"), "'price' is missing"),
    "huge int price": (_with("price", 10**400), "'price' must be a finite number > 0"),
    "negative size": (_with("size", -5), "'size' must be a finite number >= 0"),
    "non-numeric size": (_with("size", "ten"), "'size' must be a finite number >= 0, got str 'ten'"),
    "bool size": (_with("size", False), "'size' must be a finite number >= 0, got bool"),
    "NaN size": (_with("size", float("nan")), "'size' must be a finite number >= 0"),
    "not an object": (lambda tick: [tick["symbol"], tick["price"]], "record must be an object"),
}


@pytest.mark.parametrize("kind", list(BAD_TICKS))
def test_bad_tick_is_rejected_naming_the_field_and_leaves_the_state_as_if_it_never_came(ticks, kind):
    corrupt, reason = BAD_TICKS[kind]
    stream = ticks[:600]
    bad = 300
    clean, _ = run(Features(context()), stream[:bad] + stream[bad + 1:], 7)

    got, rejected = run(Features(context()), stream[:bad] + [corrupt(stream[bad])] + stream[bad + 1:], 7)

    assert list(rejected) == [bad] and reason in rejected[bad], rejected
    assert got == clean
    symbol = stream[bad]["symbol"]
    assert any(f["symbol"] == symbol and f["seq"] > stream[bad]["seq"] for f in got), "nothing after the bad tick"


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 7, 256, None], ids=["1", "7", "256", "all"])
def test_signals_equal_reference_exactly_for_any_batch_split(features, batch_size):
    got, rejected = run(Signals(context()), features, batch_size)
    assert rejected == {}
    assert got == reference_signals(features)
    assert {(s["rule"], s["signal"]) for s in got} >= EVERY_SIGNAL


def test_signals_of_reference_features_agree_with_the_stages_end_to_end(ticks, expected, features):
    # The reference's own features differ in the last bits, so strengths are
    # compared within tolerance; no threshold sits that close to a value here.
    want = reference_signals(sorted(expected.values(), key=lambda f: f["ts"]))
    got, _ = run(Signals(context()), features, 256)
    assert [(s["id"], s["signal"]) for s in got] == [(s["id"], s["signal"]) for s in want]
    assert all(math.isclose(g["strength"], w["strength"], rel_tol=TOLERANCE, abs_tol=TOLERANCE)
               for g, w in zip(got, want))


def feature(seq: int, ema_fast: float = 100.0, zscore: float = 0.0, **fields) -> dict:
    """Return a feature record of symbol A with ema_slow 100 and price 100."""
    return {"id": f"A-{seq}", "ts": seq, "symbol": "A", "seq": seq, "price": 100.0,
            "ema_fast": ema_fast, "ema_slow": 100.0, "zscore": zscore, **fields}


def test_signals_follow_the_rules_with_hysteresis_and_carry_what_triggered_them():
    stage = Signals(context(crossover_band=0.01, z_entry=2.0, z_exit=0.5))
    records = [
        feature(1, ema_fast=101.0),  # on the band's edge (100 * 1.01): stays FLAT, no signal
        feature(2, ema_fast=101.5, zscore=-2.5),  # crossover BUY; zscore BUY
        feature(3, ema_fast=100.2, zscore=-0.5),  # inside the band; |zscore| not below z_exit: keep both
        feature(4, ema_fast=98.0, zscore=0.25),  # crossover SELL; zscore FLAT
        feature(5, ema_fast=98.0, zscore=2.0),  # not beyond z_entry: keep FLAT
    ]
    got, _ = run(stage, records)
    assert got == [
        {"id": "A-2:ema_crossover", "source_id": "A-2", "ts": 2, "symbol": "A", "seq": 2, "rule": "ema_crossover",
         "signal": "BUY", "strength": 0.015, "features": {"ema_fast": 101.5, "ema_slow": 100.0, "price": 100.0}},
        {"id": "A-2:zscore", "source_id": "A-2", "ts": 2, "symbol": "A", "seq": 2, "rule": "zscore",
         "signal": "BUY", "strength": 2.5, "features": {"zscore": -2.5, "price": 100.0}},
        {"id": "A-4:ema_crossover", "source_id": "A-4", "ts": 4, "symbol": "A", "seq": 4, "rule": "ema_crossover",
         "signal": "SELL", "strength": -0.02, "features": {"ema_fast": 98.0, "ema_slow": 100.0, "price": 100.0}},
        {"id": "A-4:zscore", "source_id": "A-4", "ts": 4, "symbol": "A", "seq": 4, "rule": "zscore",
         "signal": "FLAT", "strength": -0.25, "features": {"zscore": 0.25, "price": 100.0}},
    ]


@pytest.mark.parametrize("cut", [1, 1500])
def test_signals_restored_into_a_new_instance_continue_identically(features, cut):
    whole, _ = run(Signals(context()), features, 7)
    first = Signals(context())
    before, _ = run(first, features[:cut], 7)
    second = Signals(context())
    second.restore(first.snapshot())
    after, _ = run(second, features[cut:], 7)
    assert before + after == whole
    with pytest.raises(ValueError, match="cannot restore snapshot"):
        second.restore(Features(context()).snapshot())


BAD_FEATURES = {
    "missing symbol": (_without("symbol"), "'symbol' is missing"),
    "missing ema_fast": (_without("ema_fast"), "'ema_fast' is missing"),
    "NaN zscore": (_with("zscore", float("nan")), "'zscore' must be a finite number, got float nan"),
    "infinite ema_slow": (_with("ema_slow", float("inf")), "'ema_slow' must be a finite number"),
    "zero ema_slow": (_with("ema_slow", 0.0), "'ema_slow' must be a finite number > 0"),
    "string price": (_with("price", "1"), "'price' must be a finite number, got str"),
    "bool zscore": (_with("zscore", True), "'zscore' must be a finite number, got bool"),
}


@pytest.mark.parametrize("kind", list(BAD_FEATURES))
def test_bad_feature_record_is_rejected_naming_the_field_and_changes_no_position(features, kind):
    corrupt, reason = BAD_FEATURES[kind]
    stream = features[:1500]
    # A record that would move a position, so ignoring it is observable.
    bad = next(i for i, f in enumerate(stream) if i > 100 and abs(f["zscore"]) > 2.5)
    clean, _ = run(Signals(context()), stream[:bad] + stream[bad + 1:], 7)
    got, rejected = run(Signals(context()), stream[:bad] + [corrupt(stream[bad])] + stream[bad + 1:], 7)
    assert list(rejected) == [bad] and reason in rejected[bad], rejected
    assert got == clean


# ---------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stage, params, message", [
    (Features, {"ema_fast": 0}, "param 'ema_fast' must be an EMA span, a number >= 1, got 0"),
    (Features, {"ema_fast": -3}, "param 'ema_fast'"),
    (Features, {"ema_slow": float("nan")}, "param 'ema_slow'"),
    (Features, {"ema_slow": "26"}, "param 'ema_slow'"),
    (Features, {"ema_slow": 10**400}, "param 'ema_slow'"),
    (Features, {"ema_fast": True}, "param 'ema_fast'"),
    (Features, {"ema_fast": 30}, "param 'ema_fast' (30) must be less than param 'ema_slow' (26)"),
    (Features, {"window": 1}, "param 'window' must be an integer from 2 to 100000, got 1"),
    (Features, {"window": 2.5}, "param 'window'"),
    (Features, {"window": 0}, "param 'window'"),
    (Features, {"windw": 20}, "unknown param(s) 'windw'; Features takes ema_fast, ema_slow, window"),
    (Signals, {"crossover_band": -0.1}, "param 'crossover_band' must be in [0, 1), got -0.1"),
    (Signals, {"crossover_band": float("inf")}, "param 'crossover_band' must be a finite number"),
    (Signals, {"z_entry": 0}, "param 'z_entry' must be > 0"),
    (Signals, {"z_exit": -1}, "param 'z_exit'"),
    (Signals, {"z_exit": 3.0}, "param 'z_exit' must be in [0, z_entry] = [0, 2.0], got 3.0"),
    (Signals, {"z_entry": "2"}, "param 'z_entry' must be a finite number"),
    (Signals, {"z_entry": 10**400}, "param 'z_entry' must be a finite number"),
    (Signals, {"band": 0.1}, "unknown param(s) 'band'; Signals takes crossover_band, z_entry, z_exit"),
])
def test_bad_params_are_refused_naming_the_param(stage, params, message):
    with pytest.raises(ValueError) as caught:
        stage(context(**params))
    assert message in str(caught.value)


def test_defaults_and_load_through_the_topology_handler_path():
    assert Features(context()).params == {"ema_fast": 12, "ema_slow": 26, "window": 50}
    assert Signals(context()).params == {"crossover_band": 0.0005, "z_entry": 2.0, "z_exit": 0.5}
    assert isinstance(load_handler("consumers.features:Features", context(window=20)), Features)
    with pytest.raises(HandlerLoadError, match="param 'z_entry'"):
        load_handler("consumers.signals:Signals", context(z_entry=-1))


def test_feature_seq_has_no_holes_where_bad_ticks_were_rejected():
    # A downstream keyed stage sequences on feature_seq: a hole would make it wait for a record that never comes.
    from pipeline.stage import Batch, StageContext
    stage = Features(StageContext("features", 0, Path("var")))
    ticks = [{"id": f"t{n}", "ts": n, "symbol": "A", "seq": n, "price": 10.0 + n, "size": 1} for n in range(1, 6)]
    ticks[2]["price"] = -1.0
    batch = Batch(ticks)
    out = stage(batch)["features"]
    assert list(batch.rejected) == [2]
    assert [(f["seq"], f["feature_seq"]) for f in out] == [(1, 1), (2, 2), (4, 3), (5, 4)]


def test_whole_batch_validation_gathers_what_tick_by_tick_validation_gathers(tmp_path):
    from producers.ticks import synthetic_ticks

    ticks = list(synthetic_ticks(5, 300, seed=9, run_id="g"))  # sizes are ints, prices floats
    ticks[7]["price"] = 12  # an int price is a price
    each = Features(StageContext("features", 0, tmp_path, {}))._gather_each(Batch(ticks))
    whole = Features(StageContext("features", 0, tmp_path, {}))._gather_valid(ticks)
    assert whole is not None and (list(whole[0]), *whole[1:]) == (list(each[0]), *each[1:])
    for bad in ({"price": float("nan")}, {"size": -1}, {"symbol": ""}, {"price": True}, {"size": 10**400}):
        assert Features(StageContext("features", 0, tmp_path, {}))._gather_valid([*ticks[:3], {**ticks[3], **bad}]) \
            is None, bad  # the tick-by-tick path then names the field


# ---------------------------------------------------------------------------
# The columnar paths (ticks and features in columnar envelopes)
# ---------------------------------------------------------------------------

def as_columns(records: list[dict]):
    from pipeline.stage import Columns
    return Columns({key: [r[key] for r in records] for key in records[0]})


@pytest.mark.parametrize("batch_size", [1, 7, 256], ids=["1", "7", "256"])
def test_columnar_features_are_the_record_paths_records(ticks, batch_size):
    by_records, by_columns = Features(context()), Features(context())
    for start in range(0, len(ticks), batch_size):
        part = ticks[start:start + batch_size]
        got = by_columns.columns(as_columns(part))["features"]
        assert got.records() == by_records(Batch(part))["features"]
    assert by_columns.snapshot() == by_records.snapshot()


@pytest.mark.parametrize("bad", [{"price": float("nan")}, {"size": -1}, {"symbol": ""}, {"price": True},
                                 {"size": "3"}], ids=["nan", "negative", "empty", "bool", "text"])
def test_columnar_features_leave_a_batch_with_a_bad_tick_to_the_record_path_untouched(ticks, bad):
    stage = Features(context())
    before = stage.snapshot()
    assert stage.columns(as_columns([*ticks[:5], {**ticks[5], **bad}])) is None
    assert stage.snapshot() == before


@pytest.mark.parametrize("batch_size", [1, 7, 256], ids=["1", "7", "256"])
def test_columnar_signals_are_the_record_paths_signals(features, batch_size):
    by_records, by_columns = Signals(context()), Signals(context())
    for start in range(0, len(features), batch_size):
        part = features[start:start + batch_size]
        assert by_columns.columns(as_columns(part))["signals"] == by_records(Batch(part))["signals"]
    assert by_columns.snapshot() == by_records.snapshot()


@pytest.mark.parametrize("bad", [{"zscore": float("inf")}, {"ema_slow": 0.0}, {"price": 3}, {"symbol": 7}],
                         ids=["inf", "slow0", "int", "symbol"])
def test_columnar_signals_leave_other_batches_to_the_record_path_untouched(features, bad):
    stage = Signals(context())
    stage.columns(as_columns(features[:50]))
    before = stage.snapshot()
    assert stage.columns(as_columns([*features[50:55], {**features[55], **bad}])) is None
    assert stage.snapshot() == before
