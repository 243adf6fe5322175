"""Shared helpers of the Optax adapter tests (imported by module name; no package)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dualopt.conformance.tolerances import OPEN
from dualopt.spec.vectors import Case

# Open-loop budget of the "xla-jit" numerics class, in eps per step (4: after step t the scaled error is at
# most 4 * eps * t). It covers XLA's fused multiply-adds under jit, the params + (new - params) round trip of
# optax.apply_updates, and float32 bias corrections with x64 off (measured worst on the vectors: 0.57 eps * t
# in every one of those settings).
_XLA_JIT = OPEN[("xla-jit", "float64")]
XLA_JIT_EPS_PER_STEP = _XLA_JIT.budget / _XLA_JIT.eps


def scaled_errors(case: Case, traj: Sequence[dict[str, np.ndarray]]) -> list[float]:
    """Per step: max over tensors of max|got - expected| / (largest |expected| so far, initial included)."""
    scale = {n: float(np.abs(case.initial[n]).max(initial=0.0)) for n in case.names}
    out = []
    assert len(traj) == case.steps
    for got, exp in zip(traj, case.expected):
        worst = 0.0
        for n in case.names:
            assert got[n].dtype == np.dtype(case.dtype), (n, got[n].dtype)
            assert got[n].shape == exp[n].shape
            scale[n] = max(scale[n], float(np.abs(exp[n]).max(initial=0.0)))
            err = float(np.abs(got[n].astype(np.float64) - exp[n].astype(np.float64)).max(initial=0.0))
            if scale[n] > 0:
                worst = max(worst, err / scale[n])
            else:
                assert err == 0.0
        out.append(worst)
    return out


def assert_within(case: Case, traj: Sequence[dict[str, np.ndarray]], eps_per_step: float) -> float:
    """Assert the scaled error after step t is <= eps_per_step * eps * t; return the worst ratio to that bound."""
    eps = float(np.finfo(case.dtype).eps)
    worst = 0.0
    for t, err in enumerate(scaled_errors(case, traj), start=1):
        bound = eps_per_step * eps * t
        assert err <= bound, f"{case.name}.{case.dtype} step {t}: scaled error {err:.3g} > {bound:.3g}"
        worst = max(worst, err / bound)
    return worst


def assert_bitwise(case: Case, traj: Sequence[dict[str, np.ndarray]]) -> None:
    assert len(traj) == case.steps
    for t, (got, exp) in enumerate(zip(traj, case.expected), start=1):
        for n in case.names:
            assert got[n].dtype == exp[n].dtype
            np.testing.assert_array_equal(got[n], exp[n], err_msg=f"{case.name}.{case.dtype} step {t} {n}")


def tree_equal(a: Any, b: Any) -> bool:
    """Same structure and bit-identical leaves (NaN == NaN)."""
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.tobytes() != y.tobytes():
            return False
    return True


def mlp_params(seed: int = 0, sizes: Sequence[int] = (6, 8, 8, 3), dtype: Any = np.float64) -> dict:
    """A Flax-like params dict ``{"Dense_i": {"kernel", "bias"}}`` (numpy)."""
    rng = np.random.default_rng(seed)
    return {f"Dense_{i}": {"kernel": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype),
                           "bias": (0.1 * rng.standard_normal(b)).astype(dtype)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
