"""Tests for the reference stage ``consumers.primes``: the kernel and the routing."""
from __future__ import annotations

import numpy as np
import pytest

from consumers.primes import classify, is_prime, is_prime_array
from consumers.primes_kernel import _montgomery_constants, _montmul, _mulhi
from consumers.primes_kernel import is_prime_kernel as _is_prime_kernel
from pipeline.stage import Batch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def sieve_reference(lo: int, hi: int) -> np.ndarray:
    """Return primality of every integer in [lo, hi] by a sieve of Eratosthenes."""
    is_prime = np.ones(hi + 1, dtype=bool)
    is_prime[:2] = False
    for p in range(2, int(hi**0.5) + 1):
        if is_prime[p]:
            is_prime[p * p :: p] = False
    negatives = np.zeros(max(0, -lo), dtype=bool)
    return np.concatenate([negatives, is_prime[max(lo, 0) :]])


def assert_matches_reference(values) -> None:
    """Assert the compiled kernel agrees with its plain-Python twin (Python's exact integers) on ``values``."""
    values = [int(v) for v in values]
    got = is_prime_array(np.array(values, dtype=np.int64)).tolist()
    wrong = [v for v, flag in zip(values, got) if flag != is_prime(v)]
    assert wrong == []


# --- kernel -----------------------------------------------------------------


def test_kernel_matches_sieve_from_minus_1000_to_one_million():
    values = np.arange(-1000, 1_000_001, dtype=np.int64)
    expected = sieve_reference(-1000, 1_000_000)
    got = is_prime_array(values)
    assert np.array_equal(got, expected), values[got != expected][:20]


def test_kernel_matches_python_miller_rabin_on_random_full_range_int64():
    rng = np.random.default_rng(20240601)
    uniform = rng.integers(INT64_MIN, INT64_MAX, size=10_000, dtype=np.int64, endpoint=True)
    # Uniform draws are almost all above 2**50; spread magnitudes too.
    bits = rng.integers(2, 64, size=10_000)
    spread = rng.integers(0, 2**62, size=10_000, dtype=np.int64) >> (63 - bits)
    assert_matches_reference(np.concatenate([uniform, spread | 1]))


@pytest.mark.parametrize("center", [2**63 - 1, 2**62, 2**32], ids=["2^63-1", "2^62", "2^32"])
def test_kernel_matches_python_miller_rabin_near(center):
    values = range(max(center - 3000, 0), min(center + 3000, INT64_MAX) + 1)
    assert_matches_reference(values)


@pytest.mark.parametrize(
    "n",
    [2, 3, 5, 37, 41, 61, 71, 73, 5003, 2**31 - 1, 4294967291, 4294967311, 2**61 - 1, 2**63 - 25,
     9223372036854775783],  # 4294967291 and 4294967311: the primes either side of 2**32
)
def test_known_primes(n):
    assert is_prime_array(np.array([n], dtype=np.int64)).tolist() == [True]


@pytest.mark.parametrize(
    "n",
    [
        INT64_MIN, -7, -2, -1, 0, 1, 4, 5041,
        561, 41041, 825265,  # Carmichael numbers
        2047, 3277, 4033,  # strong pseudoprimes to base 2
        1373653, 25326001, 3215031751, 2152302898747, 3474749660383,
        341550071728321, 3825123056546413051,  # strong pseudoprimes to the first k prime bases
        4759123141,  # the least strong pseudoprime to 2, 7 and 61, just above the 2**32 fast path
        2**32 - 1, 4294967297,  # 3 * 5 * 17 * 257 * 65537 and 641 * 6700417, either side of 2**32
        2**63 - 1,  # 7**2 * 73 * 127 * 337 * 92737 * 649657
        (2**31 - 1) ** 2, (2**61 - 1) * 3, 3037000493 * 3037000453,  # squares and large semiprimes
    ],
)
def test_known_non_primes(n):
    assert is_prime_array(np.array([n], dtype=np.int64)).tolist() == [False]


def test_montgomery_arithmetic_matches_python_integers():
    # Black-box primality tests cannot see a wrong base conversion (it only
    # changes which bases are tried), so check the arithmetic itself.
    rng = np.random.default_rng(7)
    moduli = rng.integers(3, 2**63, size=300, dtype=np.int64) | 1
    moduli[:3] = [3, 2**63 - 1, 2**32 + 1]
    for n in (int(v) for v in moduli):
        a, b = (int(v) % n for v in rng.integers(0, 2**63, size=2, dtype=np.int64))
        n_inv, r1, r2 = (int(v) for v in _montgomery_constants(np.uint64(n)))
        assert (n * n_inv % 2**64, r1, r2) == (1, 2**64 % n, 2**128 % n)
        got = int(_montmul(np.uint64(a), np.uint64(b), np.uint64(n), np.uint64(n_inv)))
        assert got == a * b * pow(2**64, -1, n) % n


def test_mulhi_matches_python_integers():
    rng = np.random.default_rng(11)
    pairs = rng.integers(0, 2**64, size=(2000, 2), dtype=np.uint64)
    pairs[:2] = [[2**64 - 1, 2**64 - 1], [2**32, 2**32 - 1]]
    for a, b in pairs:
        assert int(_mulhi(a, b)) == int(a) * int(b) >> 64


def test_is_prime_array_keeps_shape_and_accepts_narrower_ints():
    got = is_prime_array(np.array([[2, 4], [7, 9]], dtype=np.int32))
    assert got.dtype == np.bool_
    assert got.tolist() == [[True, False], [True, False]]
    assert is_prime_array(np.array([], dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("values", [np.array([2**63], dtype=np.uint64), np.array([2.0])])
def test_is_prime_array_refuses_values_int64_cannot_hold(values):
    with pytest.raises(TypeError, match="int64"):
        is_prime_array(values)


def test_kernel_is_compiled_at_import():
    assert _is_prime_kernel.signatures, "warm_up() did not run at import"


# --- classify ---------------------------------------------------------------


def test_classify_routes_and_flags_keeping_every_field():
    records = [
        {"id": "a", "ts": 1700000000.5, "number": 7},
        {"id": "b", "ts": 1700000001.5, "number": 8, "tags": ["x"]},
        {"id": "c", "ts": 1700000002.5, "number": 2**61 - 1},
    ]
    out = classify(Batch(records))
    assert out == {
        "prime": [
            {"id": "a", "ts": 1700000000.5, "number": 7, "prime": True},
            {"id": "c", "ts": 1700000002.5, "number": 2**61 - 1, "prime": True},
        ],
        "non_prime": [{"id": "b", "ts": 1700000001.5, "number": 8, "tags": ["x"], "prime": False}],
    }
    assert all(type(r["prime"]) is bool for rs in out.values() for r in rs)
    assert "prime" not in records[0], "classify must copy, not mutate, the input record"


def test_classify_empty_batch_emits_both_outputs():
    assert classify(Batch([])) == {"prime": [], "non_prime": []}


NOT_INT = "field 'number' must be an integer, got "
OUT_OF_RANGE = "field 'number' is outside the signed 64-bit integer range"


@pytest.mark.parametrize(
    "record, reason",
    [
        ({}, "field 'number' is missing"),
        ({"number": "abc"}, NOT_INT + "str 'abc'"),
        ({"number": 1.5}, NOT_INT + "float 1.5"),
        ({"number": True}, NOT_INT + "bool True"),
        ({"number": None}, NOT_INT + "NoneType None"),
        ({"number": 2**70}, OUT_OF_RANGE + ", got int 1180591620717411303424"),
        ({"number": -(2**63) - 1}, OUT_OF_RANGE + ", got int -9223372036854775809"),
        ({"number": 2.0**70}, OUT_OF_RANGE + " (or not an integer), got float 1.1805916207174113e+21"),
        ({"number": 10**5000}, OUT_OF_RANGE + ", got int <16610 bits>"),
        ({"number": "x" * 100}, NOT_INT + "str '" + "x" * 56 + "..."),
        (["number", 3], "record must be an object with field 'number', got list ['number', 3]"),
    ],
    ids=["missing", "str", "float", "bool", "null", "2^70", "below-int64", "huge-float",
         "int-without-repr", "long-str", "not-object"],
)
def test_classify_rejects_invalid_number_and_still_classifies_the_rest(record, reason):
    batch = Batch([{"id": 0, "number": 3}, record, {"id": 2, "number": 4}])
    out = classify(batch)
    assert batch.rejected == {1: reason}
    assert out == {
        "prime": [{"id": 0, "number": 3, "prime": True}],
        "non_prime": [{"id": 2, "number": 4, "prime": False}],
    }


def test_classify_accepts_the_int64_bounds():
    batch = Batch([{"number": INT64_MIN}, {"number": INT64_MAX}, {"number": 2**63 - 25}])
    out = classify(batch)
    assert batch.rejected == {}
    assert [r["number"] for r in out["non_prime"]] == [INT64_MIN, INT64_MAX]
    assert [r["number"] for r in out["prime"]] == [2**63 - 25]


def test_classify_finds_9592_primes_up_to_100000():
    out = classify(Batch([{"number": n} for n in range(1, 100_001)]))
    assert len(out["prime"]) == 9592
    assert len(out["non_prime"]) == 100_000 - 9592


def test_classify_columns_emits_what_classify_emits_and_declines_bad_numbers():
    from pipeline.stage import Columns
    records = [{"id": f"r{n}", "number": n} for n in (-3, 0, 1, 2, 17, 18, 2**61 - 1, 2**63 - 1)]
    expected = classify(Batch(records))
    got = classify.columns(Columns({"id": [r["id"] for r in records], "number": [r["number"] for r in records]}))
    assert {name: cols.records() for name, cols in got.items()} == expected
    for bad in ([1, True], [1, 2.0], [1, "2"], [1, 2**63]):
        assert classify.columns(Columns({"id": ["a", "b"], "number": bad})) is None
    assert classify.columns(Columns({"id": ["a"]})) is None


def test_classify_copies_dicts_and_other_mappings_without_changing_them():
    from types import MappingProxyType

    records = [{"id": 1, "number": 7}, {"id": 2, "number": 8}]
    out = classify(Batch(records))
    assert out == {"prime": [{"id": 1, "number": 7, "prime": True}],
                   "non_prime": [{"id": 2, "number": 8, "prime": False}]}
    assert records == [{"id": 1, "number": 7}, {"id": 2, "number": 8}] and out["prime"][0] is not records[0]
    proxies = [MappingProxyType(r) for r in records]
    assert classify(Batch(proxies)) == out


# --- the plain-Python twin (a worker's first second, before its kernel is loaded) ----------


def test_the_plain_python_twin_agrees_with_the_kernel():
    rng = np.random.default_rng(7)
    values = np.concatenate([np.arange(-1000, 100_001, dtype=np.int64),
                             rng.integers(INT64_MIN, INT64_MAX, size=3000, dtype=np.int64, endpoint=True),
                             np.array([2**61 - 1, 4294967291, 4294967311, INT64_MAX, INT64_MIN], dtype=np.int64)])
    assert [is_prime(v) for v in values.tolist()] == is_prime_array(values).tolist()


def test_is_prime_array_uses_the_twin_while_a_worker_defers_its_kernel(monkeypatch):
    from pipeline.records import jit
    monkeypatch.setattr(jit, "_deferred", True)
    monkeypatch.setattr(jit, "_ready", {})
    values = np.array([[1, 2, 3], [4, 2**61 - 1, 2**62]], dtype=np.int64)
    assert is_prime_array(values).tolist() == [[False, True, True], [False, True, False]]
