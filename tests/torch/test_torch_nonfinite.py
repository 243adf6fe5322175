"""Non-finite gradients through ``dualopt.torch.DualOpt`` (spec section 8, ``nonfinite="skip"``).

A NaN, +Inf or -Inf in one element of one gradient tensor makes ``step()``
change nothing: parameters, moments, anchors and step counts keep their bits,
the gradients themselves are left alone, and ``skipped`` grows by one. Then
training goes on as if the bad step had never been called: the run with bad
steps inserted equals the clean run bit for bit, and both equal the core's
:class:`decoupled_core.ReferenceOptimizer` (on torch arrays, which also skips)
bit for bit on the reference path (``foreach=False``) and the SGD fast path,
and within the documented fast-path tolerance for fused Adam.

Both finiteness checks of the fast path are exercised: small tensors (one
multi-tensor kernel call) and a tensor of at least ``Policy.fold_min_numel`` elements
(a sum, re-checked element-wise when it overflows: huge *finite* gradients
must not be skipped).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import decoupled_core as dc  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402
from dualopt.conformance.tolerances import fast_path_tolerance  # noqa: E402
from dualopt.torch._kernels import DEFAULT_POLICY  # noqa: E402

from tests.common.adapters import same_bits  # noqa: E402

LR = 0.01
SMALL = [(5, 4), (4,), (3, 5), (3,), ()]
LARGE = (DEFAULT_POLICY.fold_min_numel + 17,)


def _hps(direction: str) -> list[dc.HyperParams]:
    ft = dc.HyperParams(direction=direction, paradigm="finetune", rollback_max=20.0, rollback_min=1.0)
    sc = dc.HyperParams(direction=direction, paradigm="scratch", weight_decay=0.5)
    no = dc.HyperParams(direction=direction, paradigm="none")
    return [ft, ft, sc, sc, no]


def _build(direction: str, foreach: bool, dtype: torch.dtype, large: bool):
    gen = torch.Generator().manual_seed(3)
    shapes = SMALL + ([LARGE] if large else [])
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    hps = _hps(direction) + ([dc.HyperParams(direction=direction, paradigm="scratch", weight_decay=0.5)] if large else [])
    groups = [
        {"params": params[0:2], "paradigm": "finetune", "rollback_max": 20.0, "rollback_min": 1.0},
        {"params": params[2:4] + params[5:], "paradigm": "scratch", "weight_decay": 0.5},
        {"params": params[4:5], "paradigm": "none"},
    ]
    order = [0, 1, 2, 3, *range(5, len(params)), 4]  # the optimizer's parameter order
    opt = DualOpt(groups, lr=LR, direction=direction, foreach=foreach)
    return params, [hps[i] for i in order], order, opt


def _grads(params, k: int, bad: float | None = None, where: int = 2):
    gen = torch.Generator().manual_seed(100 + k)
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    if bad is not None:
        flat = gs[where].view(-1)
        flat[flat.numel() // 2] = bad
    return gs


def _snapshot(params, opt):
    state = []
    for p in params:
        st = opt.state.get(p, {})
        state.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return [p.detach().clone() for p in params], state, opt.skipped


def _assert_same(a, b):
    (pa, sa, _), (pb, sb, _) = a, b
    for x, y in zip(pa, pb):
        assert same_bits(_np(x), _np(y))
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert same_bits(_np(x[key]), _np(y[key])), key
            else:
                assert x[key] == y[key], key


def _np(t):
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _run(params, opt, grad_seq):
    for gs in grad_seq:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        before = _snapshot(params, opt)
        grads_before = [g.clone() for g in gs]
        opt.step()
        bad = any(not bool(torch.isfinite(g).all()) for g in gs)
        if bad:
            after = _snapshot(params, opt)
            _assert_same(before, after)
            assert after[2] == before[2] + 1
        for p, g in zip(params, grads_before):
            assert same_bits(_np(p.grad), _np(g)), "the finiteness check modified a gradient"


CASES = [
    pytest.param("adam", False, torch.float64, False, id="adam-reference-f64"),
    pytest.param("adam", True, torch.float64, False, id="adam-fast-f64"),
    pytest.param("sgd", False, torch.float32, False, id="sgd-reference-f32"),
    pytest.param("sgd", True, torch.float32, True, id="sgd-fast-f32-large"),
    pytest.param("adam", True, torch.float32, True, id="adam-fast-f32-large"),
    pytest.param("adam", True, torch.bfloat16, False, id="adam-fast-bf16"),
    pytest.param("adam", False, torch.float16, False, id="adam-reference-f16"),
]


@pytest.mark.parametrize(("direction", "foreach", "dtype", "large"), CASES)
def test_bad_steps_change_nothing_and_training_resumes_exactly(direction, foreach, dtype, large):
    clean_params, hps, order, clean_opt = _build(direction, foreach, dtype, large)
    params, _, _, opt = _build(direction, foreach, dtype, large)
    n_steps = 6
    clean = [_grads(clean_params, k) for k in range(n_steps)]
    where = len(params) - 1 if large else 2  # the large tensor, or a small scratch one
    bads = [_grads(params, 50, math.nan, where=0), _grads(params, 51, math.inf, where=where),
            _grads(params, 52, -math.inf, where=where)]
    # first call of all is bad (no state exists yet), then bad calls between good ones
    seq = [bads[0], clean[0], clean[1], bads[1], clean[2], clean[3], bads[2], bads[0], clean[4], clean[5]]
    _run(clean_params, clean_opt, clean)
    _run(params, opt, seq)
    assert opt.skipped == 4 and clean_opt.skipped == 0
    _assert_same(_snapshot(params, opt)[:2] + (0,), _snapshot(clean_params, clean_opt)[:2] + (0,))
    for p in params:
        assert opt.state[p]["step"] == n_steps

    # ... and both equal the core's ReferenceOptimizer fed the same sequence (it skips too).
    import array_api_compat.torch as xp

    ordered = [params[i] for i in order]
    ref = dc.ReferenceOptimizer([_initial(direction, dtype, large)[i] for i in order], hps, base_lr=LR, xp=xp)
    for gs in seq:
        ref.step([gs[i] for i in order], LR)
    assert ref.skipped == 4
    for p, r in zip(ordered, ref.params):
        if direction == "adam" and foreach and dtype in (torch.bfloat16, torch.float16):
            # float32 work within the fast-path tolerance, rounded back once: at most 1 ulp of the param dtype
            assert bool(((p.detach().double() - r.double()).abs() <= _ulp(r)).all())
        elif direction == "adam" and foreach:
            tol = fast_path_tolerance(dtype, n_steps)
            assert bool(((p.detach().double() - r.double()).abs() <= tol * (1.0 + r.double().abs())).all())
        else:
            assert same_bits(_np(p), _np(r))


def _initial(direction, dtype, large):
    params, *_ = _build(direction, False, dtype, large)
    return [p.detach().clone() for p in params]


def _ulp(t):
    """One ulp of ``t`` in its own dtype (an upper bound: eps * |t|, at least the smallest subnormal)."""
    info = torch.finfo(t.dtype)
    return torch.clamp(t.double().abs() * info.eps, min=info.smallest_normal * info.eps)


def test_huge_finite_gradients_are_not_skipped():
    """A large tensor whose float32 sum overflows is finite element-wise: the step is applied."""
    p = torch.nn.Parameter(torch.ones(LARGE))
    opt = DualOpt([p], lr=LR, direction="sgd", momentum=0.0, paradigm="none")
    p.grad = torch.full(LARGE, 3e38)
    assert not bool(torch.isfinite(p.grad.sum()))
    opt.step()
    assert opt.skipped == 0 and opt.state[p]["step"] == 1
    assert bool(torch.isfinite(p).all()) and float(p[0]) == np.float32(1.0) - np.float32(LR) * np.float32(3e38)


@pytest.mark.parametrize("foreach", [False, True])
def test_inf_and_minus_inf_that_cancel_in_a_sum_are_caught(foreach):
    """+Inf and -Inf in one large gradient: its sum is NaN, not a finite number, and the call is skipped."""
    p = torch.nn.Parameter(torch.ones(LARGE))
    opt = DualOpt([p], lr=LR, foreach=foreach)
    g = torch.zeros(LARGE)
    g[3], g[-3] = math.inf, -math.inf
    p.grad = g
    opt.step()
    assert opt.skipped == 1
    assert opt.state[p].get("step", 0) == 0
    assert bool((p == 1).all())


def test_propagate_lets_nan_through_and_counts_nothing():
    """``nonfinite="propagate"`` is documented as no check: the NaN reaches the parameter."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = DualOpt([p], lr=LR, nonfinite="propagate")
    p.grad = torch.tensor([1.0, math.nan, 1.0, 1.0])
    opt.step()
    assert opt.skipped == 0 and opt.state[p]["step"] == 1
    assert torch.isnan(p[1]) and bool(torch.isfinite(p[[0, 2, 3]]).all())
