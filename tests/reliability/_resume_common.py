"""Bit-for-bit comparison of two snapshots (dicts of numpy arrays), shared by the resume suites."""

from __future__ import annotations

import numpy as np


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and bits (``-0.0`` and NaN payloads included)."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for key in want:
        a, b = np.asarray(got[key]), np.asarray(want[key])
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype.kind == "f":
            assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")), key
        else:
            assert np.array_equal(a, b), key
