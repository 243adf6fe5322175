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


def differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    """Names whose dtype, shape or bits differ, or that only one side has (empty: bit-identical)."""
    bad = sorted(set(got) ^ set(want))
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            bad.append(k)
    return bad
