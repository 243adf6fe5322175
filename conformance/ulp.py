"""Distance between floats in units in the last place, computed on their bit patterns.

A float's bits, read as a sign-magnitude integer and mapped onto a two's
complement number line, are ordered like the floats themselves; the distance
between two floats is then the number of representable values between them
(``+0.0`` and ``-0.0`` are the same point, adjacent floats are 1 apart, the
largest finite float is 1 from ``inf``). NaN has no place on that line: a NaN
against a NaN counts as agreement (0), a NaN against a number as infinitely far.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ulp_distance", "max_ulp"]

_INT = {2: np.int16, 4: np.int32, 8: np.int64}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _ordered(a: np.ndarray) -> np.ndarray:
    """Map float bits onto a monotonic signed integer line (``-0.0`` and ``+0.0`` both to 0)."""
    itype = _INT[a.dtype.itemsize]
    bits = a.view(itype)
    lowest = np.iinfo(itype).min
    # Negative floats have the sign bit set: bits = lowest + magnitude; map them to -magnitude.
    # lowest - bits never overflows for bits in [lowest, -1].
    return np.where(bits < 0, lowest - bits, bits)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise ulp distance between two float arrays of the same dtype and shape.

    Returns float64 (exact below 2**53; ``inf`` where exactly one side is NaN).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([1.0, 0.0, -1.0, np.nan, np.nan])
    >>> y = np.array([np.nextafter(1.0, 2.0), -0.0, -1.0, np.nan, 1.0])
    >>> ulp_distance(x, y).tolist()
    [1.0, 0.0, 0.0, 0.0, inf]
    >>> int(ulp_distance(np.array([1.0]), np.array([-1.0]))[0]) == 2 * 0x3FF0000000000000
    True
    >>> ulp_distance(np.float32([np.finfo(np.float32).max]), np.float32([np.inf])).tolist()
    [1.0]
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.dtype != b.dtype:
        raise ValueError(f"dtypes differ: {a.dtype} vs {b.dtype}; ulp distance is defined within one dtype")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.dtype.kind != "f" or a.dtype.itemsize not in _INT:
        raise ValueError(f"dtype={a.dtype} is invalid: expected float16, float32 or float64")
    # C order so that .view() reinterprets bits in place (ascontiguousarray would turn 0-d into 1-d).
    a = np.asarray(a, order="C")
    b = np.asarray(b, order="C")
    oa, ob = _ordered(a), _ordered(b)
    utype = _UINT[a.dtype.itemsize]
    # |oa - ob| can exceed the signed range (e.g. -max vs +max): take it modulo 2**bits, unsigned.
    up = oa.astype(utype) - ob.astype(utype)
    down = ob.astype(utype) - oa.astype(utype)
    dist = np.where(oa >= ob, up, down).astype(np.float64)
    na, nb = np.isnan(a), np.isnan(b)
    dist = np.where(na & nb, 0.0, dist)
    return np.where(na ^ nb, np.inf, dist)


def max_ulp(a: np.ndarray, b: np.ndarray) -> float:
    """Largest element-wise ulp distance (0.0 for empty arrays).

    Examples
    --------
    >>> import numpy as np
    >>> max_ulp(np.float32([1, 2]), np.float32([1, 2]))
    0.0
    """
    d = ulp_distance(a, b)
    return float(d.max()) if d.size else 0.0
