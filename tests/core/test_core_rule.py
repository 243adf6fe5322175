"""Per-function tests of the rule on every namespace: state, anchors, dtypes, special shapes, purity."""

from __future__ import annotations

import math

import numpy as np
import pytest

import decoupled_core as dc
from decoupled_core import HyperParams

from tests.core._core_helpers import backend_name, from_numpy, to_numpy

ADAM_FT = HyperParams(paradigm="finetune", rollback_max=2.0)
SGD_NESTEROV_SC = HyperParams(direction="sgd", nesterov=True, momentum=0.7, weight_decay=0.5)


def rand(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({8: np.int64, 4: np.int32, 2: np.int16}[a.dtype.itemsize])


def assert_same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b))


# ----------------------------------------------------------------------------------------- dtypes

def test_compute_dtype_keeps_float32_and_float64(xp, dtype):
    dt = getattr(xp, dtype)
    assert dc.compute_dtype(dt, xp) == dt


# numpy has no bfloat16 and array-api-strict no half precision at all.
HALF = [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16"), ("jax", "float16"), ("jax", "bfloat16")]


def half_namespace(backend):
    if backend == "numpy":
        return np
    if backend == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp_torch
        return xp_torch
    return pytest.importorskip("jax.numpy")


@pytest.mark.parametrize(("backend", "low"), HALF)
def test_compute_dtype_widens_half_precision(backend, low):
    xp = half_namespace(backend)
    assert dc.compute_dtype(getattr(xp, low), xp) == xp.float32


@pytest.mark.parametrize(("backend", "low"), HALF)
@pytest.mark.parametrize("hp", [ADAM_FT, SGD_NESTEROV_SC], ids=["adam-finetune", "sgd-scratch"])
def test_half_precision_params_compute_in_float32_and_round_once(backend, low, hp):
    """State and anchor are float32; the float32 result is rounded to the param dtype once at the end."""
    xp = half_namespace(backend)
    low_dt = getattr(xp, low)
    param = xp.astype(from_numpy(xp, rand((5, 3), np.float32, 1)), low_dt)
    anchor_src = xp.astype(from_numpy(xp, rand((5, 3), np.float32, 2)), low_dt)
    state = dc.init_direction_state(param, hp.direction, xp=xp)
    anchor = dc.init_anchor(anchor_src, xp=xp)
    for s in state:
        assert s.dtype == xp.float32
    assert anchor.dtype == xp.float32
    # The widening is exact: the float32 anchor holds the half-precision value.
    assert_same_bits(to_numpy(xp.astype(anchor, low_dt)).astype(np.float32), to_numpy(anchor))
    wide_state = state
    for step in (1, 2, 3):
        grad = xp.astype(from_numpy(xp, rand((5, 3), np.float32, 10 + step)), low_dt)
        new, state = dc.step_tensor(param, grad, state, anchor, hp=hp, lr=0.05, step=step, rate=1.5, xp=xp)
        wide, wide_state = dc.step_tensor(xp.astype(param, xp.float32), xp.astype(grad, xp.float32), wide_state,
                                          anchor, hp=hp, lr=0.05, step=step, rate=1.5, xp=xp)
        assert new.dtype == low_dt
        for s, w in zip(state, wide_state):
            assert s.dtype == xp.float32
            assert_same_bits(to_numpy(s), to_numpy(w))
        assert_same_bits(to_numpy(new), to_numpy(xp.astype(wide, low_dt)))
        assert not np.array_equal(to_numpy(new), to_numpy(param))
        param = new


# ---------------------------------------------------------------------------------- state, anchor

@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_init_direction_state_is_zeros_of_param_shape(xp, dtype, direction):
    param = from_numpy(xp, rand((3, 4), dtype))
    state = dc.init_direction_state(param, direction, xp=xp)
    assert type(state) is (dc.AdamState if direction == "adam" else dc.SGDState)
    for s in state:
        assert s.dtype == getattr(xp, dtype) and tuple(s.shape) == (3, 4)
        assert not np.any(to_numpy(s))


def test_init_direction_state_rejects_unknown_direction():
    with pytest.raises(ValueError, match=r"direction='lion' is invalid: expected one of \('adam', 'sgd'\)"):
        dc.init_direction_state(np.zeros(2), "lion")


def test_init_anchor_is_a_copy_not_an_alias(xp, dtype):
    original = rand((4,), dtype, 3)
    param = from_numpy(xp, original)
    anchor = dc.init_anchor(param, xp=xp)
    assert anchor.dtype == param.dtype
    assert anchor is not param
    if backend_name(xp) == "jax":
        # jax arrays are immutable, so aliasing could not leak a later update; the values must match.
        assert_same_bits(to_numpy(anchor), original)
        return
    param[...] = 5.0  # in-place write to the parameter (numpy, torch, array-api-strict)
    assert np.all(to_numpy(param) == 5.0)
    assert_same_bits(to_numpy(anchor), original)


def test_reference_optimizer_copies_params_and_anchors(xp, dtype):
    original = rand((3,), dtype, 4)
    given_anchor = rand((3,), dtype, 5)
    param, anchor = from_numpy(xp, original), from_numpy(xp, given_anchor)
    opt = dc.ReferenceOptimizer([param, from_numpy(xp, original)], [ADAM_FT, ADAM_FT], base_lr=0.01,
                                anchors=[anchor, None], xp=xp)
    if backend_name(xp) != "jax":
        param[...] = 9.0
        anchor[...] = 9.0
    assert_same_bits(to_numpy(opt.params[0]), original)
    assert_same_bits(to_numpy(opt.anchors[0]), given_anchor)
    assert_same_bits(to_numpy(opt.anchors[1]), original)  # the snapshot
    opt.step([from_numpy(xp, rand((3,), dtype, 6))] * 2, 0.01)
    # A step moves the parameters but never the anchors.
    assert not np.array_equal(to_numpy(opt.params[1]), original)
    assert_same_bits(to_numpy(opt.anchors[1]), original)


def test_reference_optimizer_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="hps has 1 entries for 2 params"):
        dc.ReferenceOptimizer([np.zeros(2), np.zeros(2)], [ADAM_FT], base_lr=0.01)
    with pytest.raises(ValueError, match=r"anchor\[0\] has shape \(3,\), param has \(2,\)"):
        dc.ReferenceOptimizer([np.zeros(2)], [ADAM_FT], base_lr=0.01, anchors=[np.zeros(3)])


# --------------------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("hp", [ADAM_FT, SGD_NESTEROV_SC, HyperParams(paradigm="none")],
                         ids=["adam-finetune", "sgd-nesterov-scratch", "adam-none"])
@pytest.mark.parametrize("shape", [(), (0, 3)])
def test_zero_size_and_0d_tensors(xp, dtype, hp, shape):
    """0-d tensors follow the rule elementwise (same bits as a 1-element tensor); zero-size ones stay empty."""
    p_np, g_np, a_np = rand(shape, dtype, 1), rand(shape, dtype, 2), rand(shape, dtype, 3)
    param, grad, anchor = (from_numpy(xp, x) for x in (p_np, g_np, a_np))
    state = dc.init_direction_state(param, hp.direction, xp=xp)
    flat_param, flat_state = from_numpy(xp, p_np.reshape(-1)), dc.init_direction_state(
        from_numpy(xp, p_np.reshape(-1)), hp.direction, xp=xp)
    for step in (1, 2):
        param, state = dc.step_tensor(param, grad, state, anchor, hp=hp, lr=0.1, step=step, rate=1.2, xp=xp)
        flat_param, flat_state = dc.step_tensor(flat_param, from_numpy(xp, g_np.reshape(-1)), flat_state,
                                                from_numpy(xp, a_np.reshape(-1)), hp=hp, lr=0.1, step=step,
                                                rate=1.2, xp=xp)
        assert tuple(param.shape) == shape and param.dtype == getattr(xp, dtype)
        for s in state:
            assert tuple(s.shape) == shape
        assert_same_bits(to_numpy(param).reshape(-1), to_numpy(flat_param))
    if shape == ():
        assert float(to_numpy(param)) != float(p_np)  # it did move
    assert bool(dc.all_finite([grad], xp=xp))


def test_step_tensor_is_pure(xp, dtype):
    """Inputs are never written: adapters own the write-back."""
    arrays = {k: rand((6,), dtype, i) for i, k in enumerate(["param", "grad", "anchor", "m", "v"])}
    x = {k: from_numpy(xp, v) for k, v in arrays.items()}
    state = dc.AdamState(x["m"], xp.abs(x["v"]))
    v_before = to_numpy(state.exp_avg_sq)
    new, new_state = dc.step_tensor(x["param"], x["grad"], state, x["anchor"], hp=ADAM_FT, lr=0.1, step=3,
                                    rate=2.0, xp=xp)
    for k in ("param", "grad", "anchor", "m"):
        assert_same_bits(to_numpy(x[k]), arrays[k])
    assert_same_bits(to_numpy(state.exp_avg_sq), v_before)
    assert not np.array_equal(to_numpy(new), arrays["param"])
    assert not np.array_equal(to_numpy(new_state.exp_avg), arrays["m"])


def test_pull_without_anchor_equals_zero_anchor(xp, dtype):
    pre = from_numpy(xp, np.array([2.0, -3.5, 0.0, -0.0, 1e-30, 7e20], dtype=dtype))
    zero = xp.zeros_like(pre)
    for c in (0.0, 0.3, 1.0):
        assert_same_bits(to_numpy(dc.pull(pre, None, c, xp=xp)), to_numpy(dc.pull(pre, zero, c, xp=xp)))
    np.testing.assert_array_equal(to_numpy(dc.pull(pre, None, 1.0, xp=xp)), 0.0)


def test_pull_interpolates(xp, dtype):
    pre = from_numpy(xp, np.array([2.0, -4.0, 1.0], dtype=dtype))
    anchor = from_numpy(xp, np.array([1.0, 0.0, 1.0], dtype=dtype))
    np.testing.assert_array_equal(to_numpy(dc.pull(pre, anchor, 0.25, xp=xp)), np.array([1.75, -3.0, 1.0], dtype))


@pytest.mark.parametrize("paradigm", ["none", "scratch", "finetune"])
def test_zero_pull_coefficient_returns_the_pre_weight(xp, dtype, paradigm):
    """c == 0 (host-known) skips the pull: theta is the plain Adam pre-weight, bit for bit."""
    hp = HyperParams(paradigm=paradigm, rollback_max=1.0)
    p, g = from_numpy(xp, rand((7,), dtype, 1)), from_numpy(xp, rand((7,), dtype, 2))
    anchor = from_numpy(xp, rand((7,), dtype, 3))
    state = dc.init_direction_state(p, "adam", xp=xp)
    for lr, rate in [(0.1, 0.0), (0.0, 5.0)]:
        new, _ = dc.step_tensor(p, g, state, anchor, hp=hp, lr=lr, step=1, rate=rate, xp=xp)
        c = dc.adam_coefficients(lr, hp.beta1, hp.beta2, 1)
        pre, _ = dc.adam_pre_weight(p, g, state, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                                    step_size=c.step_size, inv_sqrt_bc2=c.inv_sqrt_bc2, xp=xp)
        assert_same_bits(to_numpy(new), to_numpy(pre))


@pytest.mark.parametrize("hp", [ADAM_FT, SGD_NESTEROV_SC, HyperParams(paradigm="none")],
                         ids=["adam-finetune", "sgd-nesterov-scratch", "adam-none"])
def test_traced_scalars_give_host_bits(xp, dtype, hp):
    """lr as a 0-d float64 array (how jit sees it) is cast to the compute dtype once: same bits as a host float."""
    p, g, a = (from_numpy(xp, rand((5,), dtype, i)) for i in (1, 2, 3))
    host_state = traced_state = dc.init_direction_state(p, hp.direction, xp=xp)
    host_p = traced_p = p
    for step, lr in [(1, 0.05), (2, 0.02), (3, 0.5)]:
        host_p, host_state = dc.step_tensor(host_p, g, host_state, a, hp=hp, lr=lr, step=step, rate=1.5, xp=xp)
        traced_p, traced_state = dc.step_tensor(traced_p, g, traced_state, a, hp=hp,
                                                lr=xp.asarray(lr, dtype=xp.float64), step=step, rate=1.5, xp=xp)
        assert traced_p.dtype == getattr(xp, dtype)
        assert_same_bits(to_numpy(traced_p), to_numpy(host_p))


def test_all_finite(xp, dtype):
    ok = from_numpy(xp, np.array([1.0, -2.0], dtype=dtype))
    empty = from_numpy(xp, np.zeros((0, 2), dtype=dtype))
    scalar = from_numpy(xp, np.array(3.0, dtype=dtype))
    assert dc.all_finite([]) is True
    assert dc.all_finite([None, None]) is True
    assert bool(dc.all_finite([ok, None, empty, scalar], xp=xp))
    for bad in (math.nan, math.inf, -math.inf):
        arr = from_numpy(xp, np.array([1.0, bad], dtype=dtype))
        assert not bool(dc.all_finite([ok, arr], xp=xp))
        assert not bool(dc.all_finite([from_numpy(xp, np.array(bad, dtype=dtype)), None], xp=xp))


def test_reference_nonfinite_policies(xp, dtype):
    p = from_numpy(xp, rand((3,), dtype, 1))
    bad = from_numpy(xp, np.array([0.1, math.nan, 0.2], dtype=dtype))
    skip = dc.ReferenceOptimizer([p], [ADAM_FT], base_lr=0.01, xp=xp)
    before = [to_numpy(s) for s in skip.states[0]]
    assert skip.step([bad], 0.01) is False
    assert skip.skipped == 1 and skip.steps == [0]
    assert_same_bits(to_numpy(skip.params[0]), to_numpy(p))
    for s, b in zip(skip.states[0], before):
        assert_same_bits(to_numpy(s), b)
    propagate = dc.ReferenceOptimizer([p], [ADAM_FT], base_lr=0.01, nonfinite="propagate", xp=xp)
    assert propagate.step([bad], 0.01) is True
    assert propagate.skipped == 0 and propagate.steps == [1]
    assert np.isnan(to_numpy(propagate.params[0])[1])


def test_reference_per_tensor_learning_rates(xp, dtype):
    p = [from_numpy(xp, rand((2,), dtype, i)) for i in (1, 2)]
    g = [from_numpy(xp, rand((2,), dtype, i)) for i in (3, 4)]
    hp = HyperParams(paradigm="none")
    both = dc.ReferenceOptimizer(p, [hp, hp], xp=xp)
    both.step(g, [0.1, 0.2])
    single = [dc.ReferenceOptimizer([p[i]], [hp], xp=xp) for i in (0, 1)]
    single[0].step([g[0]], 0.1)
    single[1].step([g[1]], 0.2)
    for i in (0, 1):
        assert_same_bits(to_numpy(both.params[i]), to_numpy(single[i].params[0]))


# ------------------------------------------------------------------------ keep (device-side skip)

@pytest.mark.parametrize("hp", [ADAM_FT, SGD_NESTEROV_SC, HyperParams(direction="sgd", momentum=0.5)],
                         ids=["adam-finetune", "sgd-nesterov-scratch", "sgd-heavy-ball"])
def test_keep_selects_the_state(xp, dtype, hp):
    """``keep`` true (a 0-d bool array) is the same bits as no ``keep``; false returns the old state bit for bit
    (a -0.0 in a moment keeps its sign) whatever the gradient holds, and with ``coefficients`` given the step
    is the one that computes them."""
    p, g, a = (from_numpy(xp, rand((6,), dtype, i)) for i in (1, 2, 3))
    state = dc.init_direction_state(p, hp.direction, xp=xp)
    for step in (1, 2):  # a second step from a non-zero state, with a -0.0 in the first moment
        ref, new_state = dc.step_tensor(p, g, state, a, hp=hp, lr=0.05, step=step, rate=1.5, xp=xp)
        kept, kept_state = dc.step_tensor(p, g, state, a, hp=hp, lr=0.05, step=step, rate=1.5, xp=xp,
                                          keep=xp.asarray(True))
        assert_same_bits(to_numpy(kept), to_numpy(ref))
        for x, y in zip(kept_state, new_state):
            assert_same_bits(to_numpy(x), to_numpy(y))
        if hp.direction == "adam":
            c = dc.adam_coefficients(0.05, hp.beta1, hp.beta2, step)
            given, _ = dc.step_tensor(p, g, state, a, hp=hp, lr=0.05, step=step, rate=1.5, xp=xp, coefficients=c)
            assert_same_bits(to_numpy(given), to_numpy(ref))
        first = to_numpy(new_state[0]).copy()
        first[0] = -0.0
        state = type(new_state)(from_numpy(xp, first), *new_state[1:])
    bad = from_numpy(xp, np.array([0.5, math.nan, -math.inf, math.inf, 1.0, 2.0], dtype=dtype))
    _, old = dc.step_tensor(p, bad, state, a, hp=hp, lr=0.05, step=3, rate=1.5, xp=xp, keep=xp.asarray(False))
    for x, y in zip(old, state):
        assert_same_bits(to_numpy(x), to_numpy(y))
    assert np.signbit(to_numpy(old[0])[0])


def test_keep_under_jit_keeps_the_old_moments_bitwise():
    """The same select compiled by XLA (which may fuse it into the moment updates)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    m = rand((6,), np.float32, 4)
    m[0] = -0.0
    v = np.abs(rand((6,), np.float32, 5))
    g = rand((6,), np.float32, 6)
    g[2], g[4] = np.nan, -np.inf

    def adam(theta, grad, m, v, keep):
        return dc.adam_pre_weight(theta, grad, dc.AdamState(m, v), beta1=0.9, beta2=0.999, eps=1e-8,
                                  step_size=1e-2, inv_sqrt_bc2=31.6, xp=jnp, keep=keep)[1]

    def sgd(theta, grad, m, keep):
        return dc.sgd_pre_weight(theta, grad, dc.SGDState(m), lr=0.1, momentum=0.9, nesterov=True, xp=jnp,
                                 keep=keep)[1]

    args = [jnp.asarray(x) for x in (rand((6,), np.float32, 7), g, m)]
    for fn in (adam, jax.jit(adam)):
        out = fn(*args, jnp.asarray(v), jnp.asarray(False))
        assert_same_bits(out.exp_avg, m)
        assert_same_bits(out.exp_avg_sq, v)
        assert np.signbit(np.asarray(out.exp_avg)[0])
    for fn in (sgd, jax.jit(sgd)):
        assert_same_bits(fn(*args, jnp.asarray(False)).momentum_buffer, m)
