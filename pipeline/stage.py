"""The stage contract: a function from a batch of decoded records to what it emits.

A stage is any callable ``handler(batch) -> Emit``::

    from pipeline.stage import Batch, Emit

    def classify(batch: Batch) -> Emit:
        out = {"even": [], "odd": []}
        for i, record in enumerate(batch.records):
            n = record.get("n")
            if not isinstance(n, int):
                batch.reject(i, "field 'n' must be an integer")
                continue
            out["even" if n % 2 == 0 else "odd"].append(record)
        return out

The runtime owns acknowledgement: a stage never finishes or requeues a message.
It returns the records to publish, keyed by output topic, and raises when it
cannot process the batch (the runtime then retries, and dead-letters a record
that keeps failing). It must return a mapping of its declared outputs to a
list of records or :class:`Columns` (``{}`` emits nothing): anything else,
None from a forgotten ``return`` first of all, fails the batch as a raise does.
A record that can never succeed (bad input) is passed to :meth:`Batch.reject`
with a reason; the runtime dead-letters it.

A stage may also offer a *columnar* fast path for batched envelopes
(``pack``): a function set as ``handler.columns`` takes the batch as
:class:`Columns` and returns ``{output: Columns}`` (or a list of records for
an output that gets few, like signals), or None to let the record path handle
the batch (e.g. when some record is invalid: rejects and their reasons stay
the record path's job). The runtime uses it only when every message of a
batch is a columnar envelope with the same keys, so no record is ever turned
into a dict; whatever the columnar function does not take, the record path
does exactly as before. A keyed stage's columnar function gets a batch only
when every record in it is the next ``seq`` of its key and nothing is parked;
if it raises or returns None, the runtime puts the stage's state back (its
snapshot) before the record path runs the batch. A stateful stage whose
columnar function returns None only before it changes any state says so with
a class attribute ``columns_atomic = True``: the runtime then takes no
snapshot before each call, and the state only when a checkpoint is due; if
such a call raises, or emits what cannot be published, the replica rewinds
to its last checkpoint, as after a crash, and the batch comes back.
"""
from __future__ import annotations

import importlib
import math
import operator
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import HandlerLoadError, user_frame

if TYPE_CHECKING:
    import numpy.typing as npt

Record = dict[str, Any]
Emit = Mapping[str, list[Record]]
Handler = Callable[["Batch"], Emit]


def plain(column: Any) -> list[Any]:
    """A column as a list of plain Python values: a typed column (a numpy array) converted, a list as it is."""
    values: list[Any] = column.tolist() if type(column) is np.ndarray else column
    return values


@dataclass
class Batch:
    """The decoded records a stage processes in one call.

    Parameters:
        records: the decoded records, in arrival order.
        stage: the stage's name, for messages and metrics.
        rejected: index -> reason for records the stage refused (filled by :meth:`reject`).
    """

    records: list[Record]
    stage: str = ""
    rejected: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def reject(self, index: int, reason: str) -> None:
        """Mark record ``index`` as invalid; the runtime dead-letters it with ``reason``."""
        self.rejected[index] = reason


class Columns:
    """Records as columns: one column per key, all of the same length (a columnar envelope's layout).

    A column is a list, or a numpy array: a batched envelope carries a column
    of floats, or of signed 64-bit integers, as bytes (see :mod:`pipeline.records.envelope`),
    and it arrives as a float64 or int64 array; a stage may emit
    arrays too (float and integer arrays leave as bytes, others as lists).
    ``type(column) is list`` tells the two apart; ``records()`` gives plain
    Python values either way.

    Example::

        numbers = np.asarray(columns["number"], dtype=np.int64)
        evens = columns.take(np.flatnonzero(numbers % 2 == 0)).with_column("even", True)
    """

    __slots__ = ("data", "n")

    def __init__(self, data: Mapping[str, Any], n: int | None = None):
        self.data = dict(data)
        self.n = n if n is not None else len(next(iter(self.data.values()), []))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def keys(self) -> list[str]:
        return list(self.data)

    def take(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> Columns:
        """The rows at ``indices`` (a sequence or numpy array of ints), in that order."""
        idx = indices.tolist() if hasattr(indices, "tolist") else list(indices)
        if len(idx) == 0:
            return Columns({k: col[:0] for k, col in self.data.items()}, 0)
        if any(type(col) is np.ndarray for col in self.data.values()):
            rows = indices if type(indices) is np.ndarray else np.array(idx, dtype=np.intp)
        pick: Callable[[Any], Any]
        if len(idx) == 1:
            pick = lambda col: col[rows] if type(col) is np.ndarray else [col[idx[0]]]  # noqa: E731
        else:
            getter = operator.itemgetter(*idx)
            pick = lambda col: col[rows] if type(col) is np.ndarray else list(getter(col))  # noqa: E731
        return Columns({k: pick(col) for k, col in self.data.items()}, len(idx))

    def where(self, mask: npt.NDArray[np.bool_]) -> Columns:
        """The rows where ``mask`` (a numpy bool array of length n) is true, in order."""
        count = int(mask.sum())
        if count <= self.n // 4:  # few rows: picking by index is cheaper than walking the mask
            return self.take(mask.nonzero()[0])
        flags = None
        picked: dict[str, Any] = {}
        for k, col in self.data.items():
            if type(col) is np.ndarray:
                picked[k] = col[mask]
            else:
                flags = mask.tolist() if flags is None else flags
                picked[k] = list(compress(col, flags))
        return Columns(picked, count)

    def with_column(self, key: str, values: Any) -> Columns:
        """A copy with column ``key`` set (kept in place if it exists); a value that is not a list, tuple
        or numpy array fills every row."""
        column: npt.NDArray[Any] | list[Any]
        if isinstance(values, np.ndarray):
            column = values
        else:
            column = list(values) if isinstance(values, (list, tuple)) else [values] * self.n
        if len(column) != self.n:
            raise ValueError(f"column {key!r} has {len(column)} values for {self.n} rows")
        return Columns({**self.data, key: column}, self.n)

    def records(self) -> list[Record]:
        """The rows as records (dicts of plain Python values)."""
        keys = list(self.data)
        return [dict(zip(keys, row))  # noqa: B905 - per-record hot path; lengths checked by Columns (a value per key)
                for row in zip(*map(plain, self.data.values()), strict=False)]


class ColumnBatch:
    """What middleware sees of a batch on the columnar path: its length, and records only on demand."""

    rejected: dict[int, str]

    def __init__(self, columns: Columns, stage: str = ""):
        self.columns, self.stage, self.rejected = columns, stage, {}
        self._records: list[Record] | None = None

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def records(self) -> list[Record]:
        if self._records is None:
            self._records = self.columns.records()
        return self._records


@dataclass(frozen=True)
class StageContext:
    """What a stage class is constructed with.

    Parameters:
        stage: the stage's name in the topology.
        replica: this replica's number (for a keyed stage: the partition it owns).
        var_dir: the topology's var dir, for files a stage keeps (archives).
        params: the stage's ``params`` mapping from the topology.
    """

    stage: str
    replica: int
    var_dir: Path
    params: Mapping[str, Any] = field(default_factory=dict)


class StatefulStage(Protocol):
    """A stage with state the runtime checkpoints (keyed stages).

    Constructed once per replica as ``cls(context)``; called like a stage
    function. Records arrive per key in ``seq`` order, without duplicates.
    ``snapshot()`` is taken after outputs are published and written to disk
    before the inputs are finished; ``restore()`` gets it back on restart.
    """

    def __call__(self, batch: Batch) -> Emit: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


MISSING: Any = object()  # what record.get(name, MISSING) returns for an absent field


def describe(value: object) -> str:
    """A value's type name and a repr cut to about 60 characters, for rejection reasons."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else "<huge int>"
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def as_float(value: object) -> float:
    """An int or a float (numpy's float64 too) as a float; NaN for anything else, bools included."""
    if isinstance(value, float) or type(value) is int:  # `type(...) is` keeps out bool, which subclasses int
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range
            pass
    return math.nan


def field_error(name: str, value: object, wanted: str) -> str:
    """The rejection reason for field ``name`` holding ``value`` (or :data:`MISSING`) instead of ``wanted``."""
    if value is MISSING:
        return f"field {name!r} is missing"
    return f"field {name!r} must be {wanted}, got {describe(value)}"


def merge_params(params: Mapping[str, Any], defaults: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The stage's params over its defaults.

    Raises:
        ValueError: a param the stage does not take (naming the ones it does).
    """
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown param(s) {', '.join(map(repr, unknown))}; {stage} takes {', '.join(defaults)}")
    return {**defaults, **params}


def _where(error: BaseException) -> str:
    """`` (at FILE:LINE)`` of the innermost frame of ``error`` in the user's code, or ``""``."""
    frame = user_frame(traceback.extract_tb(error.__traceback__))
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def load_handler(path: str, context: StageContext | None = None) -> Handler:
    """Import the stage named by ``module.path:name``: a function, or a class built with ``context``.

    Raises:
        HandlerLoadError: the module cannot be imported, the name is not
            callable, or the class refuses its parameters.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise HandlerLoadError(f"handler {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HandlerLoadError(f"handler {path!r}: cannot import {module_name!r}: {e}") from e
    except SyntaxError as e:
        raise HandlerLoadError(f"handler {path!r}: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from e
    except Exception as e:  # raised by the module's own code as it was imported
        raise HandlerLoadError(f"handler {path!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
                               f"{_where(e)}") from e
    handler: object = getattr(module, attr, None)
    if not callable(handler):
        raise HandlerLoadError(f"handler {path!r}: {module_name!r} has no callable {attr!r}")
    if isinstance(handler, type):
        try:
            built: Handler = handler(context or StageContext(stage="", replica=0, var_dir=Path("var")))
        except (TypeError, ValueError, KeyError) as e:
            raise HandlerLoadError(f"handler {path!r}: {e}") from e
        return built
    return handler
