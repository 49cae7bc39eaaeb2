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

The numba kernel is compiled with ``cache=True`` and run once at import
(:func:`warm_up`), so a replica pays compilation when it loads the handler,
not on its first batch, and later processes load the cached machine code.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import repeat

import numpy as np
from numba import njit

from pipeline.stage import Batch, Columns, Record

__all__ = ["classify", "is_prime_array", "warm_up"]


# ---------------------------------------------------------------------------
# Kernel: deterministic Miller-Rabin over uint64 in numba
#
# Numba has no 128-bit integers, so products of two residues are reduced with
# Montgomery multiplication, taking the high half of the 128-bit product from
# 32-bit limbs. All arithmetic is on np.uint64: numba types int64 op uint64 as
# float64, which would silently lose precision, so every constant is cast.
# ---------------------------------------------------------------------------

# Trial division by these settles most inputs before the costlier test.
_SMALL_PRIMES = np.array(
    [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71],
    dtype=np.uint64,
)
# Miller-Rabin with these bases is exact for n < 3.3e24, so for all of uint64.
_MR_BASES = np.array([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37], dtype=np.uint64)
# ... and with these for n < 4,759,123,141 (Jaeschke 1993), so for all n < 2**32.
_MR_BASES_32 = np.array([2, 7, 61], dtype=np.uint64)
_TWO_TO_32 = np.uint64(2**32)


@njit(cache=True)
def _mulhi(a, b):
    """Return the high 64 bits of the 128-bit product ``a * b`` (uint64)."""
    shift = np.uint64(32)
    mask = np.uint64(0xFFFFFFFF)
    a_lo, a_hi = a & mask, a >> shift
    b_lo, b_hi = b & mask, b >> shift
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    # At most 2 * (2**32 - 1) + (2**32 - 1)**2 == 2**64 - 1: cannot overflow.
    cross = (lo_lo >> shift) + (hi_lo & mask) + a_lo * b_hi
    return a_hi * b_hi + (hi_lo >> shift) + (cross >> shift)


@njit(cache=True)
def _inverse(n):
    """Return ``n**-1 mod 2**64`` for odd ``n`` by Newton iteration."""
    x = n  # n * n == 1 (mod 8) for odd n: correct to 3 bits, doubling each step
    for _ in range(5):
        x *= np.uint64(2) - n * x
    return x


@njit(cache=True)
def _montmul(a, b, n, n_inv):
    """Return ``a * b / 2**64 mod n`` for ``a, b < n < 2**63``, n odd (REDC)."""
    m = a * b * n_inv  # chosen so that m * n has the same low word as a * b
    hi, mn_hi = _mulhi(a, b), _mulhi(m, n)
    # (a*b - m*n) / 2**64 == hi - mn_hi exactly, and lies in (-n, n).
    if hi < mn_hi:
        return hi + n - mn_hi
    return hi - mn_hi


@njit(cache=True)
def _montgomery_constants(n):
    """Return ``n**-1 mod 2**64``, ``2**64 mod n`` and ``2**128 mod n`` for odd ``n``."""
    r1 = (np.uint64(0) - n) % n  # the Montgomery form of 1
    r2 = r1
    for _ in range(64):  # doubling avoids a 128-bit modulus for 2**128 mod n
        r2 += r2
        if r2 >= n:
            r2 -= n
    return _inverse(n), r1, r2


@njit(cache=True)
def _is_strong_probable_prime(n):
    """Return True when odd ``n > 37`` passes Miller-Rabin for every base in ``_MR_BASES``."""
    one = np.uint64(1)
    n_inv, r1, r2 = _montgomery_constants(n)
    minus_one = n - r1
    d, s = n - one, 0
    while d & one == np.uint64(0):
        d >>= one
        s += 1
    for base in _MR_BASES:
        if not _passes_base(_montmul(base, r2, n, n_inv), d, s, n, n_inv, r1, minus_one):
            return False
    return True


@njit(cache=True)
def _passes_base(base, d, s, n, n_inv, one, minus_one):
    """Return True when ``n`` is a strong probable prime to ``base`` (Montgomery forms)."""
    x, power = one, d
    while power:
        if power & np.uint64(1):
            x = _montmul(x, base, n, n_inv)
        base = _montmul(base, base, n, n_inv)
        power >>= np.uint64(1)
    if x == one or x == minus_one:
        return True
    for _ in range(s - 1):
        x = _montmul(x, x, n, n_inv)
        if x == minus_one:
            return True
    return False


@njit(cache=True)
def _is_strong_probable_prime_u32(n):
    """Miller-Rabin to the bases ``_MR_BASES_32`` for odd ``n`` with 61 < n < 2**32.

    Below 2**32 a product of two residues fits in 64 bits, so plain ``%``
    replaces Montgomery arithmetic, and bases 2, 7 and 61 are exact there
    (no composite below 4,759,123,141 is a strong pseudoprime to all three).
    """
    one = np.uint64(1)
    minus_one = n - one
    d, s = minus_one, 0
    while d & one == np.uint64(0):
        d >>= one
        s += 1
    for base in _MR_BASES_32:
        x, b, power = one, base, d
        while power:
            if power & one:
                x = x * b % n
            b = b * b % n
            power >>= one
        if x == one or x == minus_one:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == minus_one:
                break
        else:
            return False
    return True


@njit(cache=True)
def _is_prime_u64(n):
    """Return True when ``n`` (uint64, at least 2, below 2**63) is prime."""
    for p in _SMALL_PRIMES:
        if p * p > n:
            return True
        if n % p == np.uint64(0):
            return n == p
    if n < _TWO_TO_32:
        return _is_strong_probable_prime_u32(n)
    return _is_strong_probable_prime(n)


@njit(cache=True)
def _is_prime_kernel(values, out):
    """Write into ``out[i]`` whether ``values[i]`` (int64) is prime."""
    for i in range(values.shape[0]):
        v = values[i]
        out[i] = v >= 2 and _is_prime_u64(np.uint64(v))


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
    out = np.empty(flat.shape[0], dtype=np.bool_)
    _is_prime_kernel(flat, out)
    return out.reshape(values.shape)


def warm_up() -> None:
    """Compile the kernel, or load it from numba's cache, before the first batch."""
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
    ``number`` is a plain int in the signed 64-bit range.
    """
    numbers = columns.get(FIELD)
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
