"""ulp distance on the bit patterns: known values, symmetry, and agreement with nextafter walks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualopt.conformance.ulp import max_ulp, ulp_distance

DTYPES = (np.float64, np.float32, np.float16)


@pytest.mark.parametrize("dt", DTYPES)
def test_known_distances(dt):
    f = np.finfo(dt)
    one = dt(1)
    a = np.array([one, 0, 0, f.max, -f.max, f.smallest_subnormal, one, -one], dtype=dt)
    b = np.array([np.nextafter(one, dt(2)), -0.0, f.smallest_subnormal, np.inf, -np.inf, -f.smallest_subnormal,
                  one, np.nextafter(-one, dt(0))], dtype=dt)
    assert ulp_distance(a, b).tolist() == [1, 0, 1, 1, 1, 2, 0, 1]


@pytest.mark.parametrize("dt", DTYPES)
def test_opposite_signs_count_every_float_between(dt):
    bits = {np.float64: 64, np.float32: 32, np.float16: 16}[dt]
    one = np.array([1.0], dtype=dt)
    # The bit pattern of 1.0 is the number of floats in (0, 1]; -1 to 1 crosses zero once.
    expected = 2 * int(one.view(f"u{bits // 8}")[0])
    assert int(ulp_distance(one, -one)[0]) == expected
    # The widest distance (-inf to +inf) does not overflow.
    inf = np.array([np.inf], dtype=dt)
    assert int(ulp_distance(-inf, inf)[0]) == 2 * int(inf.view(f"u{bits // 8}")[0])


def test_nan_handling():
    a = np.array([np.nan, np.nan, 1.0, np.inf])
    b = np.array([np.nan, 1.0, np.nan, np.inf])
    assert ulp_distance(a, b).tolist() == [0.0, np.inf, np.inf, 0.0]
    assert max_ulp(a[:1], b[:1]) == 0.0
    assert max_ulp(np.zeros(0), np.zeros(0)) == 0.0


def test_rejects_mixed_dtypes_shapes_and_ints():
    with pytest.raises(ValueError, match="dtypes differ"):
        ulp_distance(np.float32([1]), np.float64([1]))
    with pytest.raises(ValueError, match="shapes differ"):
        ulp_distance(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="dtype=int64 is invalid"):
        ulp_distance(np.zeros(2, np.int64), np.zeros(2, np.int64))


def test_non_contiguous_and_0d():
    a = np.arange(12.0).reshape(3, 4)[:, ::2]
    b = np.nextafter(a, np.inf)
    assert ulp_distance(a, b).tolist() == [[1, 1]] * 3
    assert ulp_distance(np.float64(2.0), np.float64(2.0)).shape == ()


@settings(max_examples=200, deadline=None)
@given(x=st.floats(allow_nan=False, width=64), k=st.integers(0, 40), up=st.booleans(),
       dt=st.sampled_from([np.float64, np.float32]))
def test_matches_a_nextafter_walk(x, k, up, dt):
    with np.errstate(over="ignore"):
        start = dt(x) if np.isfinite(dt(x)) else dt(0)
    y = start
    target = dt(np.inf if up else -np.inf)
    steps = 0
    for _ in range(k):
        if y == target:
            break
        with np.errstate(over="ignore"):  # max -> inf is a legitimate last step
            y = np.nextafter(y, target)
        steps += 1
    a, b = np.array([start], dt), np.array([y], dt)
    d = ulp_distance(a, b)[0]
    # -0.0 and +0.0 compare equal, so a walk never stands on both: walk and distance agree exactly.
    assert d == steps
    assert ulp_distance(b, a)[0] == d
