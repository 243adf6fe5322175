"""Every spec vector, replayed through the reference core on every namespace and dtype.

numpy, array-api-strict and eager jax must reproduce the committed trajectories
bit for bit. torch must too wherever no square root is involved (SGD cases);
for Adam it may differ because torch's CPU ``sqrt`` is not correctly rounded
(``test_torch_sqrt_is_within_one_ulp`` checks that premise), and the difference
is bounded by :data:`TORCH_ULPS_PER_STEP` (see :func:`torch_bound`). That the
square root is the *only* difference is checked directly: with a correctly
rounded square root swapped into the torch namespace, torch reproduces every
vector bit for bit (``test_torch_with_correctly_rounded_sqrt_is_bitwise``).
"""

from __future__ import annotations

import numpy as np
import pytest

from dualopt.spec.vectors import load_cases

from tests.core._core_helpers import backend_name, replay, ulp_distance

CASES = {f"{c.name}.{c.dtype}": c for c in load_cases()}
CASE_NAMES = sorted({c.name for c in CASES.values()})

#: Allowed |torch - expected| per step, in ulps of the tensor's largest magnitude so far.
#: Reasoning: torch's sqrt is within 1 ulp of the correctly rounded value; that
#: perturbs d = sqrt(v)*r + eps by <= 1 ulp relative and the update s*(m/d), after
#: its own rounding, by <= 2 ulps of itself; the update is at most twice the
#: tensor's scale (|update| <= |theta_before| + |theta_after|), and theta's final
#: rounding may land on the neighbouring float. Each step therefore adds <= ~4 ulps
#: of the scale, and the errors can only add up over t steps (the gradients are
#: given, so nothing feeds back). This is the torch class of spec/TOLERANCES.md
#: (4 eps x t, scaled error) expressed in ulps. Measured on the committed vectors:
#: 0 (torch reproduces every element exactly); over 300 random Adam steps on 3000
#: elements: <= 1 ulp of the scale in total.
TORCH_ULPS_PER_STEP = 4

def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits (distinguishes -0.0 from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    itype = np.int64 if a.dtype == np.float64 else np.int32
    return bool(np.array_equal(a.view(itype), b.view(itype)))


def uses_sqrt(case) -> bool:
    return any(case.hp(n).direction == "adam" for n in case.names)


def torch_bound(case, name: str, step: int) -> float:
    """TORCH_ULPS_PER_STEP * t ulps of the largest |theta| of tensor ``name`` up to step ``t`` (1-based)."""
    history = [case.initial[name]] + [e[name] for e in case.expected[:step]]
    scale = max(float(np.max(np.abs(h))) for h in history)
    return TORCH_ULPS_PER_STEP * step * float(np.spacing(np.asarray(scale, dtype=case.dtype)))


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_replay_matches_vectors(xp, dtype, case_name):
    case = CASES[f"{case_name}.{dtype}"]
    trajectory, opt = replay(case, xp)
    # Layer numbering and host rates are float64 host values: exact everywhere.
    assert [float(r) for r in opt.rates] == case.rates
    assert len(trajectory) == case.steps
    exact_torch = backend_name(xp) != "torch" or not uses_sqrt(case)
    for t, (got, expected) in enumerate(zip(trajectory, case.expected), start=1):
        for name in case.names:
            g, e = got[name], expected[name]
            assert g.dtype == e.dtype and g.shape == e.shape, (name, t, g.dtype, g.shape)
            if exact_torch:
                assert bitwise_equal(g, e), f"{case_name}.{dtype} step {t} tensor {name}: {g} != {e}"
                continue
            if e.size == 0:
                continue
            worst = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64))))
            assert worst <= torch_bound(case, name, t), (name, t, worst, torch_bound(case, name, t))


class _CorrectlyRoundedSqrt:
    """The array-api-compat torch namespace with ``sqrt`` computed by numpy (correctly rounded).

    Everything else is torch's own arithmetic, so a bitwise match with the
    vectors shows that torch's ``sqrt`` is the only source of difference: a
    fused multiply-add or another order of operations would still show.
    """

    def __init__(self, xp):
        self._xp = xp
        self.__name__ = xp.__name__

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def sqrt(self, x):
        import torch

        # np.asarray: numpy returns a scalar, not a 0-d array, for a 0-d input.
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().cpu().numpy())))


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_torch_with_correctly_rounded_sqrt_is_bitwise(case_name, dtype_name):
    pytest.importorskip("torch")
    import array_api_compat.torch as xp_torch

    case = CASES[f"{case_name}.{dtype_name}"]
    trajectory, _ = replay(case, _CorrectlyRoundedSqrt(xp_torch))
    for t, (got, expected) in enumerate(zip(trajectory, case.expected), start=1):
        for name in case.names:
            assert bitwise_equal(got[name], expected[name]), f"{case_name}.{dtype_name} step {t} tensor {name}"


@pytest.mark.parametrize("case_name", ["nonfinite_skip", "missing_grads"])
def test_replay_feature_bookkeeping(xp, dtype, case_name):
    """The skip counter and per-tensor step counts follow the vectors' features."""
    case = CASES[f"{case_name}.{dtype}"]
    trajectory, opt = replay(case, xp)
    finite = [all(g is None or bool(np.all(np.isfinite(g))) for g in step.values()) for step in case.grads]
    assert opt.skipped == finite.count(False)
    for i, name in enumerate(case.names):
        applied = sum(1 for ok, step in zip(finite, case.grads) if ok and step[name] is not None)
        assert opt.steps[i] == applied
    previous = dict(case.initial)
    for ok, step, after in zip(finite, case.grads, trajectory):
        for name in case.names:
            if not ok or step[name] is None:
                assert bitwise_equal(after[name], previous[name])
            else:
                assert not bitwise_equal(after[name], previous[name])
        previous = after
    if case_name == "nonfinite_skip":
        assert finite.count(False) == 2
    else:
        assert any(g is None for step in case.grads for g in step.values())


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_torch_sqrt_is_within_one_ulp(dtype_name):
    """The premise of TORCH_ULPS_PER_STEP: torch's CPU sqrt is at most 1 ulp from the correctly
    rounded result (numpy's), across the magnitudes Adam's second moment takes."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = (rng.random(200_000) * 10.0 ** rng.integers(-30, 30, 200_000)).astype(dtype_name)
    got = torch.sqrt(torch.from_numpy(x)).numpy()
    assert int(np.max(ulp_distance(got, np.sqrt(x)))) <= 1
