"""The fast path's own branches, each proven equal to the reference path.

The vectors (test_torch_vectors.py) have small tensors only; here: tensors of
``FOLD_MIN_NUMEL`` elements and more (the scratch pull folded into the fused
AdamW call, the sum-then-recheck finiteness test), several dtypes in one group
(one bucket each), non-contiguous parameters and gradients (the reference loop
for those tensors), and plans that survive per-step hyperparameter changes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

from decoupled_core import all_finite  # noqa: E402
from dualopt._shared.torch_lists import grads_finite  # noqa: E402
from dualopt.torch._kernels import DEFAULT_POLICY  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

from tests.torch._torch_helpers import ScaledTracker, assert_same_bits  # noqa: E402

FOLD_MIN_NUMEL = DEFAULT_POLICY.fold_min_numel
BIG = (FOLD_MIN_NUMEL // 64 + 3, 64)  # just over the threshold


def _pair(shapes, dtype, **kw):
    """Two identical parameter sets and optimizers, reference loop and fast path."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    fast = [torch.nn.Parameter(t.clone()) for t in init]
    return ref, fast, DualOpt(ref, foreach=False, **kw), DualOpt(fast, foreach=True, **kw)


def _feed(ref, fast, k, transform=lambda g: g):
    gen = torch.Generator().manual_seed(50 + k)
    for p, q in zip(ref, fast):
        g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).to(p.dtype)
        p.grad, q.grad = g.clone(), transform(g.clone())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("paradigm", ["scratch", "finetune"])
def test_large_tensors_match_the_reference(paradigm, dtype):
    shapes = [BIG, (7, 5), BIG, (3,)]
    ref, fast, o_ref, o_fast = _pair(shapes, dtype, lr=0.02, paradigm=paradigm, weight_decay=0.8)
    tracker = ScaledTracker(ref)
    steps = 25
    for k in range(steps):
        _feed(ref, fast, k)
        o_ref.step()
        o_fast.step()
        tracker.check(fast, ref, k + 1, f"{paradigm} {dtype}")
    (plan,) = o_fast._plans.values()
    (bucket,) = plan.buckets
    if paradigm == "scratch":
        # The two large tensors (layers 0 and 2 of 4: two distinct coefficients) take the fold.
        assert sorted(k for ks in bucket.folded.values() for k in ks) == [0, 2]
        assert len(bucket.folded) == 2 and bucket.rest == [1, 3]
    else:
        assert bucket.folded == {} and not plan.loop
    for p, q in zip(ref, fast):
        for key in ("exp_avg", "exp_avg_sq"):
            ScaledTracker([o_ref.state[p][key]]).check([o_fast.state[q][key]], [o_ref.state[p][key]], steps, key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_sgd_tensors_are_bitwise(dtype):
    ref, fast, o_ref, o_fast = _pair([BIG, (5,), BIG], dtype, lr=0.05, direction="sgd", nesterov=True,
                                     paradigm="finetune", rollback_max=5.0)
    for k in range(10):
        _feed(ref, fast, k)
        o_ref.step()
        o_fast.step()
        for p, q in zip(ref, fast):
            assert_same_bits(q, p, f"step {k + 1}")


def test_dtypes_get_one_bucket_each():
    ref, fast, o_ref, o_fast = _pair([(4, 4)], torch.float64, lr=0.01, paradigm="finetune")
    extra = [torch.nn.Parameter(torch.randn(3, 3, dtype=dt)) for dt in (torch.float32, torch.bfloat16)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in extra]
    o_ref.add_param_group({"params": extra, "paradigm": "finetune"})
    o_fast.add_param_group({"params": twins, "paradigm": "finetune"})
    o_fast.param_groups[1]["params"] = twins
    ref, fast = ref + extra, fast + twins
    for k in range(5):
        _feed(ref, fast, k)
        o_ref.step()
        o_fast.step()
    assert sorted(str(b.dtype) for b in o_fast._plans[1].buckets) == ["torch.bfloat16", "torch.float32"]
    assert o_fast.state[twins[1]]["exp_avg"].dtype == torch.float32
    ScaledTracker(ref[:2]).check(fast[:2], ref[:2], 5)
    ulp = ref[2].detach().float().abs() * torch.finfo(torch.bfloat16).eps
    assert bool(((fast[2] - ref[2]).detach().float().abs() <= ulp).all())


@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_non_contiguous_parameters_and_gradients_take_the_reference_loop(direction):
    """A transposed parameter and, on some steps, a transposed gradient: those tensors go
    through the reference loop (the fused kernels need contiguous storage), the results
    stay equal to the reference path (bitwise: the loop *is* the reference)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ref = [torch.nn.Parameter(base.t().clone()), torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))]
    fast = [torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(ref[1].detach().clone())]
    assert not fast[0].is_contiguous()
    kw = dict(lr=0.02, direction=direction, paradigm="finetune")
    o_ref, o_fast = DualOpt(ref, foreach=False, **kw), DualOpt(fast, foreach=True, **kw)
    tracker = ScaledTracker(ref[1:])
    for k in range(6):
        transposed = k % 2 == 1
        _feed(ref, fast, k, transform=lambda g: g.t().contiguous().t() if transposed else g)
        if transposed:
            assert not fast[1].grad.is_contiguous()
        o_ref.step()
        o_fast.step()
        assert_same_bits(fast[0].detach().contiguous(), ref[0].detach(), f"step {k + 1}")
        if direction == "sgd":
            assert_same_bits(fast[1], ref[1], f"step {k + 1}")  # the loop or SGD's bitwise fast path
        else:  # steps of fused Adam in its history: the fast path's tolerance
            tracker.check(fast[1:], ref[1:], k + 1)
    (plan,) = o_fast._plans.values()
    assert plan.loop == [0]


def test_one_cycle_momentum_does_not_rebuild_the_plan():
    ref, fast, o_ref, o_fast = _pair([(5, 5), (5,)], torch.float64, lr=0.01, paradigm="finetune")
    sched = torch.optim.lr_scheduler.OneCycleLR(o_fast, max_lr=0.05, total_steps=10)
    sched_ref = torch.optim.lr_scheduler.OneCycleLR(o_ref, max_lr=0.05, total_steps=10)
    plans = set()
    for k in range(8):
        _feed(ref, fast, k)
        o_ref.step()
        o_fast.step()
        sched.step()
        sched_ref.step()
        plans.add(id(o_fast._plans[0]))
    assert len(plans) == 1
    ScaledTracker(ref).check(fast, ref, 8)
    assert o_fast.param_groups[0]["betas"][0] != 0.9  # beta1 did change along the way


def test_changing_weight_decay_rebuilds_the_pull():
    ref, fast, o_ref, o_fast = _pair([BIG, (5,)], torch.float32, lr=0.02, paradigm="scratch", weight_decay=0.1)
    for k in range(6):
        if k == 3:
            for o in (o_ref, o_fast):
                o.param_groups[0]["weight_decay"] = 0.7
        _feed(ref, fast, k)
        o_ref.step()
        o_fast.step()
    ScaledTracker(ref).check(fast, ref, 6)
    assert list(o_fast.layer_rates().values()) == [0.35, 0.7]


def test_finiteness_check_agrees_with_the_core():
    small = [torch.zeros(3), torch.zeros(4, dtype=torch.float64)]
    large = [torch.zeros(FOLD_MIN_NUMEL + 1), torch.zeros(FOLD_MIN_NUMEL, dtype=torch.bfloat16)]
    for bad_at in [None, 0, 1, 2, 3]:
        for value in (float("nan"), float("inf"), float("-inf")):
            grads = [g.clone() for g in small + large]
            if bad_at is not None:
                grads[bad_at].view(-1)[-1] = value
            expected = bool(all_finite([g.float().numpy() for g in grads], xp=np))
            assert grads_finite(grads) is expected is (bad_at is None)
    huge = [torch.full((FOLD_MIN_NUMEL,), 3e38)]  # the sum overflows, every element is finite
    assert grads_finite(huge) is bool(all_finite([h.numpy() for h in huge], xp=np)) is True
    # A finite float64 sum beyond float32's range (the sums are read back as float32), beside a large
    # float32 gradient whose sum is finite: every element is finite; then one NaN in the float32 one.
    wide = [torch.full((FOLD_MIN_NUMEL,), 1e300, dtype=torch.float64), torch.ones(FOLD_MIN_NUMEL)]
    assert grads_finite(wide) is True
    wide[1][7] = float("nan")
    assert grads_finite(wide) is False


def test_the_policy_is_an_argument_checked_and_kept_by_pickling():
    """The fast path's thresholds are a frozen Policy passed to the optimizer, not module globals."""
    import pickle

    from dualopt.torch._kernels import Policy

    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="_policy"):
        DualOpt([p], _policy={"fold_min_numel": 1})
    opt = DualOpt([p], _policy=Policy(fold_min_numel=1))
    with pytest.raises(AttributeError):
        opt._policy.fold_min_numel = 2  # frozen
    assert pickle.loads(pickle.dumps(opt))._policy == Policy(fold_min_numel=1)
    assert DualOpt([p])._policy == DEFAULT_POLICY
