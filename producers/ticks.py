"""The ticks producer: market ticks ``{"id", "ts", "symbol", "seq", "price", "size"}`` on a keyed topic.

Ticks come from a seeded simulation (:func:`synthetic_ticks`) or from a CSV
file (:func:`replay_ticks`); :func:`produce_ticks` publishes either kind,
each tick to the partition of its symbol (see :mod:`pipeline.records.partition`), so
that one replica of a keyed stage sees every tick of its symbols, in order::

    topology = load_topology("topology.yaml")
    ticks = synthetic_ticks(symbols=6, count=10_000, seed=7)
    produce_ticks("127.0.0.1:4150", "ticks", ticks, spec=topology.topics["ticks"], rate=2000)

``seq`` counts the ticks of one symbol from 1, without gaps: a keyed stage
uses it to drop redeliveries and to notice a missing tick.
"""
from __future__ import annotations

import csv
import math
import os
import time
import uuid
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from pipeline.client.producer import LINGER_MS, Producer
from pipeline.config import TopicSpec
from pipeline.errors import PipelineError

#: One second of trading time in years (252 days of 6.5 hours): the default GBM step.
ONE_TRADING_SECOND = 1 / (252 * 6.5 * 3600)
MAX_SIZE = 1000
REPLAY_COLUMNS = ("ts", "symbol", "price", "size")
# Draws are made in fixed blocks so that the first n ticks of a seed do not depend on ``count``.
_BLOCK = 4096


class ReplayError(PipelineError, ValueError):
    """Raised when a line of a replay CSV cannot be read as a tick (wrong fields, non-numeric values).

    ``str(error)`` reads ``PATH:LINE: reason``; ``error.row`` is the offending row.
    """

    def __init__(self, path: str, line: int, reason: str, row: list[str] | None = None):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.row = path, line, reason, row


def symbol_names(symbols: int) -> list[str]:
    """The names of ``symbols`` synthetic symbols: ``SYM000``, ``SYM001``, ... (wider past 1000)."""
    width = max(3, len(str(symbols - 1)))
    return [f"SYM{i:0{width}d}" for i in range(symbols)]


def synthetic_ticks(symbols: int, count: int, *, seed: int = 0, run_id: str | None = None,
                    start_price: float = 100.0, mu: float = 0.0, sigma: float = 0.2,
                    dt: float = ONE_TRADING_SECOND) -> Iterator[dict]:
    """Yield ``count`` ticks in all, over ``symbols`` symbols, each price a geometric Brownian motion.

    Each tick picks its symbol at random (so symbols interleave irregularly)
    and moves that symbol's price by one GBM step of ``dt`` years:
    ``price *= exp((mu - sigma**2 / 2) * dt + sigma * sqrt(dt) * Z)``. Sizes
    are uniform in 1..1000. Everything but ``ts`` (the creation time, in ns)
    and a random ``run_id`` is determined by ``seed``, and the first n ticks
    of a seed are the same whatever ``count`` is.

    Raises:
        ValueError: symbols < 1, count < 0, start_price <= 0, sigma < 0 or dt <= 0.
    """
    _check_gbm(symbols, count, start_price, sigma, dt)
    run = run_id or uuid.uuid4().hex[:8]
    names = symbol_names(symbols)
    prices, seqs = [float(start_price)] * symbols, [0] * symbols
    drift, vol = (mu - sigma * sigma / 2) * dt, sigma * math.sqrt(dt)
    rng = np.random.default_rng(seed)
    for first in range(0, count, _BLOCK):
        # tolist(): plain Python numbers, which every codec encodes (msgpack refuses numpy scalars)
        picks = rng.integers(0, symbols, _BLOCK).tolist()
        growth = np.exp(drift + vol * rng.standard_normal(_BLOCK)).tolist()
        sizes = rng.integers(1, MAX_SIZE + 1, _BLOCK).tolist()
        for i in range(min(_BLOCK, count - first)):
            s = picks[i]
            prices[s] *= growth[i]
            seqs[s] += 1
            yield {"id": f"{run}-{names[s]}-{seqs[s]}", "ts": time.time_ns(), "symbol": names[s],
                   "seq": seqs[s], "price": prices[s], "size": sizes[i]}


def _check_gbm(symbols: int, count: int, start_price: float, sigma: float, dt: float) -> None:
    for ok, rule, value in ((symbols >= 1, "symbols must be >= 1", symbols), (count >= 0, "count must be >= 0", count),
                            (start_price > 0, "start_price must be > 0", start_price),
                            (sigma >= 0, "sigma must be >= 0", sigma), (dt > 0, "dt must be > 0", dt)):
        if not ok:
            raise ValueError(f"{rule}, not {value!r}")


def replay_ticks(path: str | os.PathLike[str], *, run_id: str | None = None) -> Iterator[dict]:
    """Yield the ticks of a CSV file with the header ``ts,symbol,price,size`` (columns in any order).

    ``ts`` is the original time in integer nanoseconds and is kept; ``seq``
    is assigned per symbol in file order. Blank lines are skipped and
    spaces around a field are ignored.

    A line that cannot become a tick of the right types (wrong number of
    fields, ``ts`` or ``size`` not an integer, ``price`` not a number) raises
    :class:`ReplayError` naming the line, after the lines before it were
    yielded. A well-typed but implausible tick (a price <= 0 or NaN, a size
    <= 0, an empty symbol, a ``ts`` going backwards) is yielded as it is, so
    the pipeline's validation dead-letters it like any bad input.

    Raises:
        ReplayError: the header or a line is malformed.
        OSError: the file cannot be read.
    """
    run = run_id or uuid.uuid4().hex[:8]
    shown = os.fspath(path)
    seqs: dict[str, int] = {}
    with open(path, "rb") as f:
        reader = csv.reader(_text_lines(f, shown), strict=True)  # strict: a stray quote is an error
        rows = _rows(reader, shown)
        order = _header(next(rows, None), reader.line_num, shown)
        for row in rows:
            if not row:
                continue
            ts, symbol, price, size = _parse_row(row, order, shown, reader.line_num)
            seq = seqs[symbol] = seqs.get(symbol, 0) + 1
            yield {"id": f"{run}-{symbol}-{seq}", "ts": ts, "symbol": symbol, "seq": seq,
                   "price": price, "size": size}


def _text_lines(f: BinaryIO, shown: str) -> Iterator[str]:
    """Decode ``f`` line by line, so a line that is not UTF-8 is reported with its number."""
    for number, raw in enumerate(f, 1):
        try:
            # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first column name
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ReplayError(shown, number, f"not UTF-8 text: {e}") from e


def _rows(reader, shown: str) -> Iterator[list[str]]:
    """The rows of ``reader``, with CSV errors turned into ReplayErrors naming the line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ReplayError(shown, reader.line_num, f"not CSV: {e}") from e


def _header(row: list[str] | None, line: int, shown: str) -> list[int]:
    """Check the header row; return the positions of ts, symbol, price and size."""
    if row is None:
        raise ReplayError(shown, 1, f"empty file; expected the header {','.join(REPLAY_COLUMNS)}")
    names = [name.strip() for name in row]
    if sorted(names) != sorted(REPLAY_COLUMNS):
        raise ReplayError(shown, line,
                          f"header must name the columns {','.join(REPLAY_COLUMNS)}, got {','.join(names)}", row)
    return [names.index(column) for column in REPLAY_COLUMNS]


def _parse_row(row: list[str], order: list[int], shown: str, line: int) -> tuple[int, str, float, int]:
    if len(row) != len(REPLAY_COLUMNS):
        raise ReplayError(shown, line, f"expected {len(REPLAY_COLUMNS)} fields, got {len(row)}", row)
    ts, symbol, price, size = (row[i] for i in order)
    values = []
    for name, text, parse, kind in (("ts", ts, int, "an integer"), ("price", price, float, "a number"),
                                    ("size", size, int, "an integer")):
        try:
            values.append(parse(text))
        except ValueError:
            raise ReplayError(shown, line, f"{name} {text!r} is not {kind}", row) from None
    return values[0], symbol.strip(), values[1], values[2]


def parse_speed(speed: str | float) -> float | None:
    """Read a replay speed: ``"max"`` (None: no pacing) or a positive factor (1.0 = original pace).

    Raises:
        ValueError: neither ``max`` nor a finite number above 0.
    """
    if isinstance(speed, str) and speed.strip().lower() == "max":
        return None
    try:
        factor = float(speed)
    except (TypeError, ValueError):
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"speed must be 'max' or a number above 0 (1 = original pace), not {speed!r}")
    return factor


def produce_ticks(address: str | Sequence[str], topic: str, records: Iterable[dict], *,
                  spec: TopicSpec | None = None,
                  rate: float = 0.0, speed: str | float = "max", chunk: int = 500,
                  on_progress: Callable[[int], None] | None = None, security=None,
                  linger_ms: float = LINGER_MS) -> int:
    """Publish ``records`` to ``topic`` on the nsqd at ``address``; return how many nsqd acknowledged.

    Each record goes to the physical topic of its partition (``<topic>.<k>``
    by ``spec.key``; the topic itself when unpartitioned), encoded with
    ``spec.codec`` or packed into envelopes of ``spec.pack`` records. One
    connection carries every MPUB, and a partition's records are sent in
    the order given, so nsqd receives each partition in order. With several
    nsqd nodes in ``address``, each partition stays on one node while it is
    up and moves to the next when it fails (per-key ``seq`` keeps the order
    keyed stages need across a failover). It returns
    once every MPUB was acknowledged (or raises), so the result is the number
    of records. A bad record (a :class:`ReplayError` from the iterator, a
    missing key) stops the run after every record before it was published
    and acknowledged; after a PublishError, what nsqd took is unknown.

    Parameters:
        spec: the topic's declaration (partitions, key, codec, pack); None: a plain JSON topic.
        rate: records per second; 0 publishes as fast as nsqd accepts.
        speed: pace by the records' ``ts`` (ns): ``"max"`` ignores it, a factor
            replays at that multiple of the original pace (2 = twice as fast).
        chunk: messages per MPUB.
        linger_ms: when paced, records due within this many ms are buffered
            rather than slept for, and the buffer is sent before each sleep or
            once its oldest record has waited this long (also when the
            producer is behind its rate and never sleeps): a record waits at
            most about this long in the producer (less: lower latency; more:
            fewer, fuller messages).
        on_progress: called with the number of records acknowledged so far.

    Raises:
        PublishError: nsqd refused a publish or could not be reached.
        PartitionKeyError: a record of a partitioned topic has no usable key.
        ValueError: both ``rate`` and ``speed`` are given, or either is invalid.
    """
    factor = parse_speed(speed)
    # The records' own seq, numbered per run by synthetic_ticks and replay_ticks
    # (`pipeline produce ticks` numbers them durably instead: publish_ticks).
    with Producer.to(address, topic, spec, chunk=chunk, security=security, keep_seq=True) as producer:
        producer.on_progress = on_progress
        return producer.publish(records, rate=rate, speed=factor, linger_ms=linger_ms)


def publish_ticks(producer: Producer, records: Iterable[dict], *, rate: float = 0.0, speed: str | float = "max",
                  on_progress: Callable[[int], None] | None = None, linger_ms: float = LINGER_MS) -> int:
    """:func:`produce_ticks` through ``producer``, which numbers each symbol's ticks where its last run stopped."""
    producer.on_progress = on_progress
    return producer.publish(records, rate=rate, speed=parse_speed(speed), linger_ms=linger_ms)
