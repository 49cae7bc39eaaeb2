"""A keyed stage: rolling per-symbol features of market ticks, in one numba kernel per batch.

Each tick ``{"id", "ts", "symbol", "seq", "price", "size"}`` becomes one record
on the output ``features`` with the tick's fields and, over the symbol's ticks
so far (``p`` the price, ``q`` the size, ``W`` the ``window`` param, ``n`` the
number of ticks in the window: ``min(ticks seen, W)``)::

    log_return  r_t = ln(p_t / p_{t-1})                    (0.0 on a symbol's first tick)
    ema_fast    e_t = a p_t + (1 - a) e_{t-1}, a = 2 / (span + 1), e_0 = p_0
    ema_slow    the same with the ``ema_slow`` span
    mean        sum(p) / n                                 (the last n prices, current included)
    std         sqrt(sum((p - mean)^2) / n)                (population: ddof = 0)
    zscore      (p_t - mean) / std                         (0.0 when std == 0)
    vwap        sum(p q) / sum(q)                          (mean when sum(q) == 0)
    rv          sqrt(sum(r^2))                             (the last n log returns)

Ticks without a non-empty string ``symbol``, a finite ``price`` > 0 or a
finite ``size`` >= 0 (bools are not numbers here) are rejected with a reason
naming the field, and leave the symbol's state as if they never came.
``price`` and ``size`` are emitted as floats; ``id``, ``ts``, ``symbol`` and
``seq`` are copied.

The stage is a class, so a topology passes it params and the runtime
checkpoints it (see :class:`pipeline.stage.StatefulStage`)::

    stages:
      features:
        handler: consumers.features:Features
        keyed: true
        params: {ema_fast: 12, ema_slow: 26, window: 50}

Called directly::

    from pathlib import Path
    from pipeline.stage import Batch, StageContext
    from consumers.features import Features

    features = Features(StageContext("features", 0, Path("var"), {"window": 20}))
    features(Batch([{"id": "a-1", "ts": 0, "symbol": "A", "seq": 1, "price": 10.0, "size": 3}]))
    # {'features': [{'id': 'a-1', ..., 'price': 10.0, 'size': 3.0, 'log_return': 0.0,
    #                'ema_fast': 10.0, ..., 'zscore': 0.0, 'vwap': 10.0, 'rv': 0.0}]}

The shape is that of :mod:`consumers.primes`: validate in Python, gather the
valid ticks into arrays, and run the math in one compiled call per batch. The
state is a ring buffer per symbol (a row of a numpy array), so a snapshot is a
few array copies. Window statistics are recomputed from the ring on every tick
(O(window), cheap in numba) instead of kept as running sums, which would drift
from the exact values over a long stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
from numba import njit

from pipeline.stage import MISSING, Batch, Columns, Record, StageContext, as_float, describe, field_error, merge_params

__all__ = ["Features", "FEATURE_FIELDS", "warm_up"]

OUTPUT = "features"
# The fields the kernel computes, in the order of its output columns.
FEATURE_FIELDS = ("log_return", "ema_fast", "ema_slow", "mean", "std", "zscore", "vwap", "rv")
DEFAULTS: Mapping[str, Any] = {"ema_fast": 12, "ema_slow": 26, "window": 50}
MAX_WINDOW = 100_000  # the ring holds window floats x 3 per symbol, and each tick reads it
SNAPSHOT_FORMAT = "consumers.features/1"
_INITIAL_CAPACITY = 16
_NUMBERS = {int, float}


# ---------------------------------------------------------------------------
# Kernel: one pass over a batch, updating each symbol's ring in place
# ---------------------------------------------------------------------------

@njit(cache=True)
def _window_stats(prices, sizes, returns, n, p):
    """Return mean, std, (p - mean) / std, vwap and rv over the first ``n`` slots of a symbol's rings."""
    # Deviations from the current price are exact for nearby prices, so a
    # window of equal prices has a std of exactly 0 and a zscore of 0, not
    # rounding noise divided by rounding noise.
    dev_sum, pq_sum, q_sum, r2_sum = 0.0, 0.0, 0.0, 0.0
    for j in range(n):
        dev_sum += prices[j] - p
        pq_sum += prices[j] * sizes[j]
        q_sum += sizes[j]
        r2_sum += returns[j] * returns[j]
    mean_dev = dev_sum / n
    ss = 0.0
    for j in range(n):
        d = prices[j] - p - mean_dev
        ss += d * d
    std = np.sqrt(ss / n)
    mean = p + mean_dev
    zscore = -mean_dev / std if std > 0.0 else 0.0
    vwap = pq_sum / q_sum if q_sum > 0.0 else mean
    return mean, std, zscore, vwap, np.sqrt(r2_sum)


@njit(cache=True)
def _features_kernel(symbols, prices, sizes, alpha_fast, alpha_slow,
                     ring_prices, ring_sizes, ring_returns, counts, ema_fast, ema_slow, out, feature_seqs):
    """Apply each tick to its symbol's state, in order, and write its features into ``out[:, i]``.

    ``feature_seqs[i]`` numbers tick i's feature per symbol: 1, 2, 3 ... with no holes. A rejected
    tick leaves a hole in the ticks' ``seq``; downstream keyed stages sequence on ``feature_seq``
    instead, so they never wait for it.
    """
    window = ring_prices.shape[1]
    for i in range(symbols.shape[0]):
        s, p = symbols[i], prices[i]
        seen = counts[s]
        if seen == 0:
            r, fast, slow = 0.0, p, p
        else:
            r = np.log(p / ring_prices[s, (seen - 1) % window])
            fast = alpha_fast * p + (1.0 - alpha_fast) * ema_fast[s]
            slow = alpha_slow * p + (1.0 - alpha_slow) * ema_slow[s]
        slot = seen % window
        ring_prices[s, slot], ring_sizes[s, slot], ring_returns[s, slot] = p, sizes[i], r
        counts[s], ema_fast[s], ema_slow[s] = seen + 1, fast, slow
        feature_seqs[i] = seen + 1
        # Before the ring wraps, slots 0..seen hold every tick; after, all slots do.
        n = min(seen + 1, window)
        mean, std, zscore, vwap, rv = _window_stats(ring_prices[s], ring_sizes[s], ring_returns[s], n, p)
        out[0, i], out[1, i], out[2, i], out[3, i] = r, fast, slow, mean
        out[4, i], out[5, i], out[6, i], out[7, i] = std, zscore, vwap, rv


# ---------------------------------------------------------------------------
# State: per-symbol rings and scalars, one row per symbol index
# ---------------------------------------------------------------------------

@dataclass
class _State:
    """The arrays the kernel updates; row ``k`` belongs to the symbol with index ``k``."""

    prices: np.ndarray  # (capacity, window) float64: the last `window` prices, a ring
    sizes: np.ndarray  # (capacity, window) float64: the matching sizes
    returns: np.ndarray  # (capacity, window) float64: the matching log returns
    counts: np.ndarray  # (capacity,) int64: ticks applied; counts % window is the next slot
    ema_fast: np.ndarray  # (capacity,) float64
    ema_slow: np.ndarray  # (capacity,) float64

    @classmethod
    def empty(cls, capacity: int, window: int) -> _State:
        """Return zeroed state for ``capacity`` symbols."""
        ring = (capacity, window)
        return cls(np.zeros(ring), np.zeros(ring), np.zeros(ring),
                   np.zeros(capacity, dtype=np.int64), np.zeros(capacity), np.zeros(capacity))

    @property
    def capacity(self) -> int:
        """How many symbols the arrays have rows for."""
        return self.counts.shape[0]

    def resized(self, capacity: int, used: int) -> _State:
        """Return a copy with room for ``capacity`` symbols, keeping the first ``used`` rows."""
        new = _State.empty(capacity, self.prices.shape[1])
        for name in _STATE_ARRAYS:
            getattr(new, name)[:used] = getattr(self, name)[:used]
        return new


_STATE_ARRAYS = tuple(f.name for f in fields(_State))


# ---------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------

class Features:
    """Per-symbol rolling features of ticks: log return, EMAs, mean/std/zscore, VWAP, realized vol.

    Parameters (``context.params``):
        ema_fast: span of the fast EMA, a number >= 1 (default 12).
        ema_slow: span of the slow EMA, a number > ema_fast (default 26).
        window: ticks in the rolling window, an integer in [2, 100000] (default 50).

    Raises:
        ValueError: a param is unknown or out of bounds; the message names it.
    """

    #: :meth:`columns` declines only before it changes any state (see :mod:`pipeline.stage`).
    columns_atomic = True

    def __init__(self, context: StageContext):
        params = _checked_params(context.params)
        self.ema_fast_span, self.ema_slow_span, self.window = params
        self._alpha_fast = 2.0 / (self.ema_fast_span + 1.0)
        self._alpha_slow = 2.0 / (self.ema_slow_span + 1.0)
        self._index: dict[str, int] = {}  # symbol -> row in the state arrays
        self._state = _State.empty(_INITIAL_CAPACITY, self.window)

    @property
    def params(self) -> dict[str, Any]:
        """The validated params, as the topology would spell them."""
        return {"ema_fast": self.ema_fast_span, "ema_slow": self.ema_slow_span, "window": self.window}

    def __call__(self, batch: Batch) -> dict[str, list[Record]]:
        """Emit one ``features`` record per valid tick; reject the others with a reason."""
        rows, symbols, prices, sizes = self._gather(batch)
        if not rows:
            return {OUTPUT: []}
        out, feature_seqs = self._apply(symbols, prices, sizes)
        return {OUTPUT: _feature_records(batch.records, rows, prices, sizes, out, feature_seqs.tolist())}

    def _apply(self, symbols: list[int], prices, sizes) -> tuple[np.ndarray, np.ndarray]:
        """Run the kernel over valid ticks (symbol indices, prices, sizes as lists or float arrays);
        return their features (one row per field) and feature_seqs (int64)."""
        out = np.empty((len(FEATURE_FIELDS), len(symbols)))
        feature_seqs = np.empty(len(symbols), dtype=np.int64)
        st = self._state
        _features_kernel(np.array(symbols, dtype=np.int64), np.asarray(prices, dtype=np.float64),
                         np.asarray(sizes, dtype=np.float64), self._alpha_fast, self._alpha_slow,
                         st.prices, st.sizes, st.returns, st.counts, st.ema_fast, st.ema_slow, out, feature_seqs)
        return out, feature_seqs

    def columns(self, ticks: Columns) -> dict[str, Columns] | None:
        """:meth:`__call__` for ticks held as columns (a columnar envelope); None unless every tick is valid.

        The same features, in the same record layout, as columns: the runtime
        packs them into envelopes without a dict per tick, and the numeric ones
        (float64 and int64 arrays, straight from the kernel) as bytes.
        """
        if "symbol" not in ticks or "price" not in ticks or "size" not in ticks:
            return None
        symbols = ticks["symbol"]
        gathered = self._valid_columns(symbols, ticks["price"], ticks["size"])
        if gathered is None:
            return None
        ks, prices, sizes = gathered
        n = len(ticks)
        out, feature_seqs = self._apply(ks, prices, sizes)
        absent = [None] * n  # as record.get() gives for a tick without the field
        data = {"id": ticks.get("id", absent), "ts": ticks.get("ts", absent), "symbol": symbols,
                "seq": ticks.get("seq", absent), "feature_seq": feature_seqs, "price": prices, "size": sizes}
        data.update(zip(FEATURE_FIELDS, out))
        return {OUTPUT: Columns(data, n)}

    def _gather(self, batch: Batch) -> tuple[Sequence[int], list[int], list[float], list[float]]:
        """Return the valid ticks' batch indices, symbol indices, prices and sizes; reject the others."""
        gathered = self._gather_valid(batch.records)
        return gathered if gathered is not None else self._gather_each(batch)

    def _gather_valid(self, records: list) -> tuple[range, list[int], list[float], list[float]] | None:
        """:meth:`_gather` for the common batch where every tick is valid, by whole columns; else None."""
        try:
            symbols = [record["symbol"] for record in records]
            prices = [record["price"] for record in records]
            sizes = [record["size"] for record in records]
        except (KeyError, TypeError):
            return None
        gathered = self._valid_columns(symbols, prices, sizes)
        return None if gathered is None else (range(len(records)), *gathered)

    def _valid_columns(self, symbols: list, prices, sizes) -> tuple[list[int], Any, Any] | None:
        """The symbol indices, prices and sizes (as floats) of ticks given as columns, if all are valid; else None.

        Prices and sizes come as lists, or as arrays (a batched envelope's typed columns), and are
        returned the same way, as floats. None sends the batch to the tick-by-tick path, which names
        each bad tick, so the check may be conservative (see :func:`_floats_at_least`).
        """
        if set(map(type, symbols)) != {str} or "" in symbols:
            return None
        prices, sizes = _floats_at_least(prices, 0.0, strict=True), _floats_at_least(sizes, 0.0, strict=False)
        if prices is None or sizes is None:
            return None
        index = self._index
        ks = [index.get(symbol) for symbol in symbols]
        if None in ks:
            ks = [index[symbol] if symbol in index else self._add_symbol(symbol) for symbol in symbols]
        return ks, prices, sizes

    def _gather_each(self, batch: Batch) -> tuple[list[int], list[int], list[float], list[float]]:
        """:meth:`_gather` tick by tick, rejecting each invalid one with its reason."""
        rows: list[int] = []
        symbols: list[int] = []
        prices: list[float] = []
        sizes: list[float] = []
        index = self._index
        for i, record in enumerate(batch.records):
            tick = _parse_tick(record)
            if type(tick) is str:
                batch.reject(i, tick)
                continue
            symbol, price, size = tick
            k = index.get(symbol)
            if k is None:
                k = self._add_symbol(symbol)
            rows.append(i)
            symbols.append(k)
            prices.append(price)
            sizes.append(size)
        return rows, symbols, prices, sizes

    def _add_symbol(self, symbol: str) -> int:
        """Give ``symbol`` the next row, doubling the state arrays when they are full."""
        k = len(self._index)
        if k == self._state.capacity:
            self._state = self._state.resized(2 * k, k)
        self._index[symbol] = k
        return k

    def snapshot(self) -> bytes:
        """Return the whole state (symbols, rings, EMAs) as msgpack bytes for :meth:`restore`."""
        used = len(self._index)
        arrays = {name: _pack_array(getattr(self._state, name)[:used]) for name in _STATE_ARRAYS}
        return msgpack.packb({"format": SNAPSHOT_FORMAT, "params": self.params,
                              "symbols": list(self._index), "arrays": arrays}, use_bin_type=True)

    def restore(self, data: bytes) -> None:
        """Replace the state with a :meth:`snapshot`; later outputs are bit-identical to the original's.

        Raises:
            ValueError: the bytes are not a snapshot of this stage, or were
                taken with other params (the rings would not fit them).
        """
        try:
            snap = msgpack.unpackb(data, raw=False)
            if snap.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {snap.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
            if snap["params"] != self.params:
                raise ValueError(f"it was taken with params {snap['params']}, this stage has {self.params}; "
                                 "delete the checkpoint to start over with the new params")
            symbols = list(snap["symbols"])
            used = len(symbols)
            if len(set(symbols)) != used or not all(type(symbol) is str for symbol in symbols):
                raise ValueError("symbols must be distinct strings")
            arrays = {name: _unpack_array(snap["arrays"][name]) for name in _STATE_ARRAYS}
            state = _State(**arrays)
            _check_shapes(state, used, self.window)
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise ValueError(f"features: cannot restore snapshot: {e}") from e
        # Build everything first, so a bad snapshot leaves the stage as it was.
        self._state = state.resized(max(_INITIAL_CAPACITY, used), used)
        self._index = {symbol: k for k, symbol in enumerate(symbols)}


def _floats_at_least(column, bound: float, strict: bool) -> list[float] | np.ndarray | None:
    """``column`` (ints and floats, as a list or a numeric array) as floats, if every value is finite and
    above ``bound`` (``strict``) or at least it; else None.

    Conservative: a sum that is not finite (a NaN or an infinity among the values, or values so large
    that their sum overflows) declines the whole column. A list is checked with C-level builtins, no
    numpy: a batch here is often a few dozen ticks, where each numpy call costs more than the check.
    """
    if type(column) is np.ndarray:
        if column.dtype.kind not in "fi":
            return None
        values = column.astype(np.float64)  # a copy: the state may keep nothing of the batch
        low, total = values.min(), values.sum()
    else:
        if not set(map(type, column)) <= _NUMBERS:  # bool is not int here (type(), not isinstance())
            return None
        try:
            values = list(map(float, column))
        except OverflowError:  # an int beyond the float range
            return None
        low, total = min(values), sum(values)
    return values if (low > bound if strict else low >= bound) and math.isfinite(total) else None


def _feature_records(records: list[Record], rows: list[int], prices: list[float],
                     sizes: list[float], out: np.ndarray, feature_seqs: list[int]) -> list[Record]:
    """Build the output records from the valid ticks and the kernel's columns."""
    emitted = []
    columns = zip(rows, prices, sizes, feature_seqs, *out.tolist())
    for i, price, size, fseq, r, fast, slow, mean, std, z, vwap, rv in columns:
        tick = records[i]
        emitted.append({
            "id": tick.get("id"), "ts": tick.get("ts"), "symbol": tick["symbol"], "seq": tick.get("seq"),
            "feature_seq": fseq,
            "price": price, "size": size, "log_return": r, "ema_fast": fast, "ema_slow": slow,
            "mean": mean, "std": std, "zscore": z, "vwap": vwap, "rv": rv,
        })
    return emitted


# ---------------------------------------------------------------------------
# Validation of ticks and params
# ---------------------------------------------------------------------------

def _parse_tick(record: object) -> tuple[str, float, float] | str:
    """Return a tick's (symbol, price, size), or the reason it cannot be used."""
    if not isinstance(record, dict):
        return f"record must be an object with symbol, price and size, got {describe(record)}"
    symbol = record.get("symbol", MISSING)
    if type(symbol) is not str or not symbol:
        return field_error("symbol", symbol, "a non-empty string")
    # Floats, the usual case, skip the call; the comparisons also refuse NaN.
    price = record.get("price", MISSING)
    if type(price) is not float:
        price = as_float(price)
    if not 0.0 < price < math.inf:
        return field_error("price", record.get("price", MISSING), "a finite number > 0")
    size = record.get("size", MISSING)
    if type(size) is not float:
        size = as_float(size)
    if not 0.0 <= size < math.inf:
        return field_error("size", record.get("size", MISSING), "a finite number >= 0")
    return symbol, price, size








def _checked_params(params: Mapping[str, Any]) -> tuple[float, float, int]:
    """Return (ema_fast, ema_slow, window) from ``params`` with defaults, or raise ValueError."""
    merged = merge_params(params, DEFAULTS, "Features")
    fast, slow, window = merged["ema_fast"], merged["ema_slow"], merged["window"]
    for name, span in (("ema_fast", fast), ("ema_slow", slow)):
        if not 1.0 <= as_float(span) < math.inf:
            raise ValueError(f"param {name!r} must be an EMA span, a number >= 1, got {span!r:.60}")
    if not fast < slow:
        raise ValueError(f"param 'ema_fast' ({fast!r}) must be less than param 'ema_slow' ({slow!r})")
    if type(window) is not int or not 2 <= window <= MAX_WINDOW:
        raise ValueError(f"param 'window' must be an integer from 2 to {MAX_WINDOW}, got {window!r:.60}")
    return fast, slow, window


# ---------------------------------------------------------------------------
# Snapshot encoding: raw little-endian array bytes with dtype and shape
# ---------------------------------------------------------------------------

def _pack_array(array: np.ndarray) -> dict[str, Any]:
    """Return ``array`` as a msgpack-ready map (copying only its bytes, which is fast)."""
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def _unpack_array(packed: Mapping[str, Any]) -> np.ndarray:
    """Return the writable array :func:`_pack_array` packed."""
    dtype = np.dtype(packed["dtype"])
    if dtype not in (np.dtype("<f8"), np.dtype("<i8")):
        raise ValueError(f"unexpected dtype {dtype}")
    return np.frombuffer(packed["data"], dtype=dtype).reshape(packed["shape"]).copy()


def _check_shapes(state: _State, used: int, window: int) -> None:
    """Raise ValueError unless ``state`` has ``used`` rows of the right shape and dtype."""
    for name in _STATE_ARRAYS:
        array = getattr(state, name)
        shape = (used, window) if name in ("prices", "sizes", "returns") else (used,)
        kind = np.int64 if name == "counts" else np.float64
        if array.shape != shape or array.dtype != kind:
            raise ValueError(f"array {name!r} has shape {array.shape} and dtype {array.dtype}, "
                             f"expected {shape} and {np.dtype(kind)}")


def warm_up() -> None:
    """Compile the kernel, or load it from numba's cache, before the first batch."""
    state = _State.empty(1, 2)
    _features_kernel(np.zeros(2, dtype=np.int64), np.ones(2), np.ones(2), 0.5, 0.25,
                     state.prices, state.sizes, state.returns, state.counts,
                     state.ema_fast, state.ema_slow, np.empty((len(FEATURE_FIELDS), 2)), np.empty(2, dtype=np.int64))


warm_up()
