"""A keyed stage: trading signals from feature records, emitted when a rule's position changes.

Two rules run per symbol, each holding a position ``BUY``, ``SELL`` or
``FLAT`` (``FLAT`` before the symbol's first record):

- ``ema_crossover``, with ``b`` the ``crossover_band`` param (hysteresis)::

      BUY   when ema_fast > ema_slow * (1 + b)
      SELL  when ema_fast < ema_slow * (1 - b)
      otherwise the previous position

  strength = (ema_fast - ema_slow) / ema_slow

- ``zscore`` (mean reversion), with the ``z_entry`` and ``z_exit`` params::

      BUY   when zscore < -z_entry
      SELL  when zscore > z_entry
      FLAT  when |zscore| < z_exit
      otherwise the previous position

  strength = -zscore

A record on the output ``signals`` is emitted only when a position changes::

    {"id": "<feature id>:<rule>", "source_id": "<feature id>", "ts", "symbol", "seq",
     "rule": "ema_crossover" | "zscore", "signal": "BUY" | "SELL" | "FLAT",
     "strength": float, "features": {"ema_fast", "ema_slow", "price"} | {"zscore", "price"}}

so the signal's ``id`` stays unique per source record and rule, and a
redelivered feature record yields the same ids. Records without a non-empty
string ``symbol`` or with a missing or non-finite ``price``, ``ema_fast``,
``ema_slow`` or ``zscore`` (or ``ema_slow`` <= 0) are rejected with a reason
naming the field and change no position.

Signals are cheap, so this stage is plain Python per record; its state is a
small dict, snapshotted as msgpack. In a topology, reading the output of
:mod:`consumers.features`::

    stages:
      signals:
        handler: consumers.signals:Signals
        keyed: true
        params: {crossover_band: 0.0005, z_entry: 2.0, z_exit: 0.5}
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import msgpack

from pipeline.stage import (MISSING, Batch, Columns, Record, StageContext, as_float, field_error, merge_params,
                            plain)

__all__ = ["Signals", "crossover_position", "zscore_position"]

OUTPUT = "signals"
BUY, SELL, FLAT = "BUY", "SELL", "FLAT"
POSITIONS = (BUY, SELL, FLAT)
RULES = ("ema_crossover", "zscore")
DEFAULTS: Mapping[str, Any] = {"crossover_band": 0.0005, "z_entry": 2.0, "z_exit": 0.5}
SNAPSHOT_FORMAT = "consumers.signals/1"
_NUMERIC_FIELDS = ("price", "ema_fast", "ema_slow", "zscore")


def crossover_position(ema_fast: float, ema_slow: float, band: float, previous: str) -> str:
    """Return the EMA-crossover position: outside the band around ema_slow, the side ema_fast is on."""
    if ema_fast > ema_slow * (1.0 + band):
        return BUY
    if ema_fast < ema_slow * (1.0 - band):
        return SELL
    return previous


def zscore_position(zscore: float, z_entry: float, z_exit: float, previous: str) -> str:
    """Return the mean-reversion position: against a stretched price, flat once it is back near the mean."""
    if zscore < -z_entry:
        return BUY
    if zscore > z_entry:
        return SELL
    if abs(zscore) < z_exit:
        return FLAT
    return previous


class Signals:
    """Per-symbol EMA-crossover and zscore positions; emits a signal record when one changes.

    Parameters (``context.params``):
        crossover_band: hysteresis of the crossover rule, a number in [0, 1) (default 0.0005).
        z_entry: |zscore| beyond which the zscore rule takes a position, > 0 (default 2.0).
        z_exit: |zscore| below which it goes flat, in [0, z_entry] (default 0.5).

    Raises:
        ValueError: a param is unknown or out of bounds; the message names it.
    """

    #: :meth:`columns` declines only before it changes any state (see :mod:`pipeline.stage`).
    columns_atomic = True

    def __init__(self, context: StageContext):
        self.crossover_band, self.z_entry, self.z_exit = _checked_params(context.params)
        # symbol -> [crossover position, zscore position]
        self._positions: dict[str, list[str]] = {}

    @property
    def params(self) -> dict[str, float]:
        """The validated params, as the topology would spell them."""
        return {"crossover_band": self.crossover_band, "z_entry": self.z_entry, "z_exit": self.z_exit}

    def __call__(self, batch: Batch) -> dict[str, list[Record]]:
        """Emit a ``signals`` record per position change; reject invalid feature records."""
        emitted: list[Record] = []
        for i, record in enumerate(batch.records):
            parsed = _parse_feature(record)
            if type(parsed) is str:
                batch.reject(i, parsed)
            else:
                self._apply(record.get("id"), record.get("ts"), record.get("seq"), *parsed, emitted)
        return {OUTPUT: emitted}

    def columns(self, features: Columns) -> dict[str, list[Record]] | None:
        """:meth:`__call__` for feature records held as columns; None unless every record is valid."""
        if "symbol" not in features or not all(name in features for name in _NUMERIC_FIELDS):
            return None
        symbols = features["symbol"]
        # A batched envelope's float columns arrive as float64 arrays; the loop below wants Python floats.
        numbers = [plain(features[name]) for name in _NUMERIC_FIELDS]
        if set(map(type, symbols)) != {str} or "" in symbols or any(set(map(type, c)) != {float} for c in numbers):
            return None  # ints, NaN-free or not, take the record path, which names the field
        # A sum that is not finite: a NaN or an infinity in the column (or a sum that overflows, which
        # the record path then takes as it would anyway). C-level builtins: a batch is often small.
        if not (all(map(math.isfinite, map(sum, numbers))) and min(numbers[2]) > 0.0):
            return None
        n = len(features)
        absent = [None] * n
        emitted: list[Record] = []
        apply = self._apply
        for row in zip(plain(features.get("id", absent)), plain(features.get("ts", absent)),
                       plain(features.get("seq", absent)), symbols, *numbers):
            apply(*row, emitted)
        return {OUTPUT: emitted}

    def _apply(self, source_id: Any, ts: Any, seq: Any, symbol: str, price: float, fast: float, slow: float,
               z: float, emitted: list[Record]) -> None:
        """Move both rules' positions for ``symbol``, appending a signal per change."""
        held = self._positions.get(symbol)
        if held is None:
            held = self._positions[symbol] = [FLAT, FLAT]
        crossover = crossover_position(fast, slow, self.crossover_band, held[0])
        if crossover != held[0]:
            held[0] = crossover
            emitted.append(_signal(source_id, ts, symbol, seq, "ema_crossover", crossover, (fast - slow) / slow,
                                   {"ema_fast": fast, "ema_slow": slow, "price": price}))
        reversion = zscore_position(z, self.z_entry, self.z_exit, held[1])
        if reversion != held[1]:
            held[1] = reversion
            emitted.append(_signal(source_id, ts, symbol, seq, "zscore", reversion, -z, {"zscore": z, "price": price}))

    def snapshot(self) -> bytes:
        """Return every symbol's positions as msgpack bytes for :meth:`restore`."""
        return msgpack.packb({"format": SNAPSHOT_FORMAT, "positions": self._positions}, use_bin_type=True)

    def restore(self, data: bytes) -> None:
        """Replace the positions with a :meth:`snapshot`.

        Params may differ from the snapshot's: positions do not depend on
        them, and new thresholds apply from the next record.

        Raises:
            ValueError: the bytes are not a snapshot of this stage.
        """
        try:
            snap = msgpack.unpackb(data, raw=False)
            if snap.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {snap.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
            positions = {symbol: list(held) for symbol, held in snap["positions"].items()}
            for symbol, held in positions.items():
                if not isinstance(symbol, str) or len(held) != 2 or not set(held) <= set(POSITIONS):
                    raise ValueError(f"bad positions {held!r} for symbol {symbol!r}")
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise ValueError(f"signals: cannot restore snapshot: {e}") from e
        self._positions = positions


def _signal(source_id: Any, ts: Any, symbol: str, seq: Any, rule: str, position: str, strength: float,
            features: dict[str, float]) -> Record:
    """Build the signal record for ``rule`` moving to ``position`` on the feature record ``source_id``."""
    return {"id": f"{source_id}:{rule}", "source_id": source_id, "ts": ts, "symbol": symbol, "seq": seq,
            "rule": rule, "signal": position, "strength": strength, "features": features}


def _parse_feature(record: object) -> tuple[str, float, float, float, float] | str:
    """Return a feature record's (symbol, price, ema_fast, ema_slow, zscore), or why it cannot be used."""
    if not isinstance(record, dict):
        return f"record must be an object with symbol and features, got {type(record).__name__}"
    symbol = record.get("symbol", MISSING)
    if type(symbol) is not str or not symbol:
        return field_error("symbol", symbol, "a non-empty string")
    values = []
    for name in _NUMERIC_FIELDS:
        value = record.get(name, MISSING)
        if type(value) is not float:  # floats, the usual case, skip the call
            value = as_float(value)
        if not -math.inf < value < math.inf:  # also false for NaN
            return field_error(name, record.get(name, MISSING), "a finite number")
        values.append(value)
    price, fast, slow, z = values
    if not slow > 0.0:
        return field_error("ema_slow", record["ema_slow"], "a finite number > 0")
    return symbol, price, fast, slow, z




def _is_finite_number(value: object) -> bool:
    """Return True when ``value`` is an int or float (never a bool) with a finite float value."""
    return -math.inf < (value if type(value) is float else as_float(value)) < math.inf




def _checked_params(params: Mapping[str, Any]) -> tuple[float, float, float]:
    """Return (crossover_band, z_entry, z_exit) from ``params`` with defaults, or raise ValueError."""
    merged = merge_params(params, DEFAULTS, "Signals")
    for name, value in merged.items():
        if not _is_finite_number(value):
            raise ValueError(f"param {name!r} must be a finite number, got {value!r:.60}")
    band, entry, exit_ = (float(merged[name]) for name in DEFAULTS)
    if not 0.0 <= band < 1.0:
        raise ValueError(f"param 'crossover_band' must be in [0, 1), got {band!r}")
    if not entry > 0.0:
        raise ValueError(f"param 'z_entry' must be > 0, got {entry!r}")
    if not 0.0 <= exit_ <= entry:
        raise ValueError(f"param 'z_exit' must be in [0, z_entry] = [0, {entry!r}], got {exit_!r}")
    return band, entry, exit_
