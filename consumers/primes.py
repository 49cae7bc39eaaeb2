"""The reference stage: route records by whether their ``number`` is prime.

Each record needs a ``number`` field holding a signed 64-bit integer. The stage
emits it unchanged, with ``"prime": True`` or ``"prime": False`` added, on the
output ``prime`` or ``non_prime``; records without a usable ``number`` are
rejected with a reason, and the runtime dead-letters them. A topology names it
as ``handler: consumers.primes:classify``; called directly::

    from pipeline.stage import Batch
    from consumers.primes import classify

    classify(Batch([{"id": 1, "number": 7}, {"id": 2, "number": 8}]))
    # {'prime': [{'id': 1, 'number': 7, 'prime': True}],
    #  'non_prime': [{'id': 2, 'number': 8, 'prime': False}]}

It shows the shape a numeric stage should take: validate records in Python,
gather the valid values into one numpy array, and do the math in a single
compiled call per batch (:func:`is_prime_array`) rather than once per record.

The numba kernel (:mod:`consumers.primes_kernel`) is compiled with
``cache=True`` and run once at import (:func:`warm_up`), so a process pays
compilation when it loads the handler, not on its first batch, and later
processes load the cached machine code. A worker defers even that (see
:mod:`pipeline.records.jit`): it subscribes first and loads the kernel in the
background, classifying with :func:`is_prime`, the same test in plain Python,
for the second that takes.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import repeat

import numpy as np

from pipeline.records import jit
from pipeline.stage import Batch, Columns, Record

__all__ = ["classify", "is_prime", "is_prime_array", "warm_up"]


_KERNEL = jit.register("consumers.primes_kernel")
# Miller-Rabin with these bases is exact for n < 3.3e24, so for every int64 (the plain-Python twin's bases).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime_array(values: np.ndarray) -> np.ndarray:
    """Return a boolean array telling which of ``values`` are prime.

    Exact for every signed 64-bit integer; values below 2 are not prime.

    Parameters:
        values: integers of any shape; their dtype must cast safely to int64
            (so not uint64, whose top half int64 cannot hold).

    Raises:
        TypeError: ``values`` is not an array of integers that fit in int64.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "iu" or not np.can_cast(values.dtype, np.int64):
        raise TypeError(f"is_prime_array needs int64 values, got dtype {values.dtype}")
    flat = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
    compiled = jit.kernel(_KERNEL)
    if compiled is None:  # a worker's first second, before its kernels are loaded
        return np.array(list(map(is_prime, flat.tolist())), dtype=np.bool_).reshape(values.shape)
    out = np.empty(flat.shape[0], dtype=np.bool_)
    compiled.is_prime_kernel(flat, out)
    return out.reshape(values.shape)


def is_prime(n: int) -> bool:
    """Whether the integer ``n`` is prime: the same deterministic Miller-Rabin as the kernel, in plain Python."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for base in _MR_BASES:
        x = pow(base, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def warm_up() -> None:
    """Compile the kernel, or load it from numba's cache, before the first batch (unless a worker defers it)."""
    if not jit.deferred():
        is_prime_array(np.array([2, 2**61 - 1], dtype=np.int64))


# ---------------------------------------------------------------------------
# Stage: validate records, classify them in one kernel call, route them
# ---------------------------------------------------------------------------

FIELD = "number"
FLAG = "prime"
OUTPUTS = ("prime", "non_prime")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_REPR = 60
_MISSING = object()


def classify(batch: Batch) -> dict[str, list[Record]]:
    """Route each record to ``prime`` or ``non_prime`` with a ``prime`` flag added.

    Records whose ``number`` is missing, not an integer, or outside the signed
    64-bit range are passed to :meth:`Batch.reject` and emitted nowhere.
    """
    indices, numbers = _valid_numbers(batch)
    flags = is_prime_array(np.array(numbers, dtype=np.int64))
    positions = np.arange(len(numbers)) if isinstance(indices, range) else np.array(indices, dtype=np.int64)
    dicts = set(map(type, batch.records)) == {dict}
    return {"prime": _flagged(batch.records, positions[flags], True, dicts),
            "non_prime": _flagged(batch.records, positions[~flags], False, dicts)}


def _flagged(records: list[Record], positions: np.ndarray, flag: bool, dicts: bool) -> list[Record]:
    """Copies of ``records[positions]`` with ``"prime": flag`` added (copies: the stage never mutates its input).

    ``dicts``: every record is a plain dict, so ``record | {...}`` copies it
    at C speed, with no Python code per record; other mappings are unpacked.
    """
    picked = map(records.__getitem__, positions.tolist())
    if dicts:
        return list(map(operator.or_, picked, repeat({FLAG: flag})))
    return [{**record, FLAG: flag} for record in picked]


def classify_columns(columns: Columns) -> dict[str, Columns] | None:
    """:func:`classify` on columns (batched envelopes): the same outputs, without a dict per record.

    Returns None, handing the batch to :func:`classify`, unless every
    ``number`` is a plain int in the signed 64-bit range (an int64 column of
    a batched envelope is, by construction).
    """
    numbers = columns.get(FIELD)
    if type(numbers) is np.ndarray:  # an int64 column of a batched envelope: no conversion at all
        if numbers.dtype != np.int64:
            return None
        values = numbers
    else:
        if numbers is None or set(map(type, numbers)) != {int}:
            return None
        try:
            values = np.array(numbers, dtype=np.int64)
        except OverflowError:
            return None
    flags = is_prime_array(values)
    return {"prime": columns.where(flags).with_column("prime", True),
            "non_prime": columns.where(~flags).with_column("prime", False)}


classify.columns = classify_columns


def _valid_numbers(batch: Batch) -> tuple[Sequence[int], list[int]]:
    """Return the indices and numbers of valid records; reject the others."""
    try:  # the common case, checked at C speed: every record has a plain int in range
        numbers = [record[FIELD] for record in batch.records]
        if set(map(type, numbers)) == {int} and _INT64_MIN <= min(numbers) and max(numbers) <= _INT64_MAX:
            return range(len(numbers)), numbers
    except (KeyError, TypeError):
        pass
    indices: list[int] = []
    numbers: list[int] = []
    for i, record in enumerate(batch.records):
        try:
            value = record[FIELD]
        except (KeyError, TypeError):  # TypeError: the record is not a mapping
            value = _MISSING
        # `type(...) is int` keeps out bool, which subclasses int; decoders
        # only ever produce plain ints.
        if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
            indices.append(i)
            numbers.append(value)
        else:
            batch.reject(i, _rejection_reason(record, value))
    return indices, numbers


def _rejection_reason(record: object, value: object) -> str:
    """Say why ``value``, read from ``record``, is not a usable number."""
    if value is _MISSING:
        if isinstance(record, dict):
            return f"field {FIELD!r} is missing"
        return f"record must be an object with field {FIELD!r}, got {_describe(record)}"
    out_of_range = f"field {FIELD!r} is outside the signed 64-bit integer range"
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT64_MIN <= value <= _INT64_MAX:
            return f"{out_of_range}, got {_describe(value)}"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        # Some JSON decoders turn integers too large for 64 bits into floats.
        return f"{out_of_range} (or not an integer), got {_describe(value)}"
    return f"field {FIELD!r} must be an integer, got {_describe(value)}"


def _describe(value: object) -> str:
    """Return ``value``'s type name and a repr cut to about 60 characters."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond sys.get_int_max_str_digits() have no repr
        text = f"<{value.bit_length()} bits>" if isinstance(value, int) else "<no repr>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{type(value).__name__} {text}"


warm_up()
