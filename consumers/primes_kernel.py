"""The compiled half of :mod:`consumers.primes`: deterministic Miller-Rabin over int64 in numba.

Loaded through :mod:`pipeline.records.jit`: a worker loads it after it is consuming,
and :func:`consumers.primes.is_prime_array` uses its plain-Python twin until then.
"""
from __future__ import annotations

import numpy as np
from numba import njit

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
def is_prime_kernel(values, out):
    """Write into ``out[i]`` whether ``values[i]`` (int64) is prime."""
    for i in range(values.shape[0]):
        v = values[i]
        out[i] = v >= 2 and _is_prime_u64(np.uint64(v))


def warm_up() -> None:
    """Compile the kernel, or load it from numba's cache."""
    is_prime_kernel(np.array([2, 2**61 - 1], dtype=np.int64), np.empty(2, dtype=np.bool_))


warm_up()
