"""Shared helpers of the core tests: moving arrays between namespaces, ulp distances, replaying a case.

Kept out of conftest.py so that test modules import plain functions rather
than fixtures (``from tests.core._core_helpers import ...``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import decoupled_core as dc
from dualopt.conformance.ulp import ulp_distance  # noqa: F401  (re-exported for the tests)
from dualopt.spec.vectors import Case


def backend_name(xp: Any) -> str:
    """'numpy', 'array_api_strict', 'torch' or 'jax' for a namespace module."""
    name = xp.__name__
    if name.startswith("array_api_compat."):
        name = name.split(".")[1]
    return name.split(".")[0]


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy of an array of any namespace (bfloat16 torch tensors are widened exactly)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy().copy()
    if mod.startswith("array_api_strict"):
        return np.from_dlpack(x).copy()
    return np.array(x, copy=True)


def from_numpy(xp: Any, a: np.ndarray | None, dtype: Any = None) -> Any:
    """``a`` as an array of ``xp`` (``dtype`` a namespace dtype; default: ``a``'s own)."""
    if a is None:
        return None
    if dtype is None:
        dtype = getattr(xp, np.asarray(a).dtype.name)
    # np.array, not np.ascontiguousarray: the latter turns a 0-d array into shape (1,).
    return xp.asarray(np.array(a, order="C", copy=True), dtype=dtype)


def replay(case: Case, xp: Any) -> tuple[list[dict[str, np.ndarray]], dc.ReferenceOptimizer]:
    """Run ``case`` through :class:`decoupled_core.ReferenceOptimizer` on ``xp``.

    Returns the parameters after every step (as numpy arrays) and the optimizer.
    """
    dt = getattr(xp, case.dtype)
    names = case.names
    opt = dc.ReferenceOptimizer(
        [from_numpy(xp, case.initial[n], dt) for n in names], [case.hp(n) for n in names],
        base_lr=case.base_lr, layer_index=case.layer_index,
        anchors=[from_numpy(xp, case.anchor.get(n), dt) for n in names], nonfinite=case.nonfinite, xp=xp)
    trajectory = []
    for grads, lr in zip(case.grads, case.lr):
        opt.step([from_numpy(xp, grads[n], dt) for n in names], lr)
        trajectory.append({n: to_numpy(p) for n, p in zip(names, opt.params)})
    return trajectory, opt
