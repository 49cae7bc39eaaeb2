"""An offline reference for the market-data stages, written from the formulas, not from the stages.

:func:`reference_features` walks each symbol's ticks in a plain loop and
recomputes every window from a list slice with the standard library:
``statistics.pstdev`` works in exact rational arithmetic and ``math.fsum``
rounds once, so the reference is more exact than the stage it checks (and a
window of equal prices gets a std of exactly 0 by construction).
:func:`reference_signals` applies the two signal rules to any feature records.
Both take only valid records: the callers (the tests, the chaos checker) drop the bad ones themselves.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Iterable

Tick = dict[str, Any]


def ema_alpha(span: float) -> float:
    """Return the smoothing factor of an EMA with the given span."""
    return 2.0 / (span + 1.0)


def symbol_features(ticks: list[Tick], ema_fast: float, ema_slow: float, window: int) -> list[dict[str, float]]:
    """Return the features of one symbol's ticks, in order."""
    prices: list[float] = []
    sizes: list[float] = []
    returns: list[float] = []
    fast = slow = 0.0
    rows = []
    for tick in ticks:
        price, size = float(tick["price"]), float(tick["size"])
        if not prices:
            log_return, fast, slow = 0.0, price, price
        else:
            log_return = math.log(price / prices[-1])
            fast = ema_alpha(ema_fast) * price + (1.0 - ema_alpha(ema_fast)) * fast
            slow = ema_alpha(ema_slow) * price + (1.0 - ema_alpha(ema_slow)) * slow
        prices.append(price)
        sizes.append(size)
        returns.append(log_return)
        p_win, q_win, r_win = prices[-window:], sizes[-window:], returns[-window:]
        mean = statistics.fmean(p_win)
        std = statistics.pstdev(p_win)
        volume = math.fsum(q_win)
        rows.append({
            "log_return": log_return,
            "ema_fast": fast,
            "ema_slow": slow,
            "mean": mean,
            "std": std,
            "zscore": (price - mean) / std if std != 0.0 else 0.0,
            "vwap": math.fsum(p * q for p, q in zip(p_win, q_win)) / volume if volume != 0.0 else mean,
            "rv": math.sqrt(math.fsum(r * r for r in r_win)),
        })
    return rows


def reference_features(ticks: Iterable[Tick], ema_fast: float = 12, ema_slow: float = 26,
                       window: int = 50) -> dict[tuple[str, int], dict[str, Any]]:
    """Return the feature record of every tick, keyed by (symbol, seq)."""
    by_symbol: dict[str, list[Tick]] = defaultdict(list)
    for tick in ticks:
        by_symbol[tick["symbol"]].append(tick)
    out = {}
    for symbol, symbol_ticks in by_symbol.items():
        rows = symbol_features(symbol_ticks, ema_fast, ema_slow, window)
        for n, (tick, row) in enumerate(zip(symbol_ticks, rows), start=1):
            out[(symbol, tick["seq"])] = {
                "id": tick["id"], "ts": tick["ts"], "symbol": symbol, "seq": tick["seq"], "feature_seq": n,
                "price": float(tick["price"]), "size": float(tick["size"]), **row,
            }
    return out


def reference_signals(features: Iterable[dict[str, Any]], crossover_band: float = 0.0005,
                      z_entry: float = 2.0, z_exit: float = 0.5) -> list[dict[str, Any]]:
    """Return the signals the two rules emit over ``features``, in record order."""
    crossover: dict[str, str] = defaultdict(lambda: "FLAT")
    reversion: dict[str, str] = defaultdict(lambda: "FLAT")
    signals = []
    for f in features:
        symbol = f["symbol"]
        if f["ema_fast"] > f["ema_slow"] * (1 + crossover_band):
            new = "BUY"
        elif f["ema_fast"] < f["ema_slow"] * (1 - crossover_band):
            new = "SELL"
        else:
            new = crossover[symbol]
        if new != crossover[symbol]:
            crossover[symbol] = new
            signals.append(_signal(f, "ema_crossover", new, (f["ema_fast"] - f["ema_slow"]) / f["ema_slow"],
                                   {"ema_fast": f["ema_fast"], "ema_slow": f["ema_slow"], "price": f["price"]}))
        if f["zscore"] < -z_entry:
            new = "BUY"
        elif f["zscore"] > z_entry:
            new = "SELL"
        elif abs(f["zscore"]) < z_exit:
            new = "FLAT"
        else:
            new = reversion[symbol]
        if new != reversion[symbol]:
            reversion[symbol] = new
            signals.append(_signal(f, "zscore", new, -f["zscore"], {"zscore": f["zscore"], "price": f["price"]}))
    return signals


def _signal(f: dict[str, Any], rule: str, signal: str, strength: float, used: dict[str, float]) -> dict[str, Any]:
    """Return the signal record ``rule`` emits on feature record ``f``."""
    return {"id": f"{f['id']}:{rule}", "source_id": f["id"], "ts": f["ts"], "symbol": f["symbol"],
            "seq": f["seq"], "rule": rule, "signal": signal, "strength": strength, "features": used}
