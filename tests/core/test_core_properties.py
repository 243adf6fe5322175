"""Property tests of the rule (hypothesis): pull bounds, agreement with an independent evaluation of
the spec's formulas, rho = 0 reductions, finiteness, on random shapes including 0-d and zero-size."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import decoupled_core as dc
from decoupled_core import HyperParams

from tests.common.oracle import spec_step
from tests.core._core_helpers import from_numpy, to_numpy

PROPERTY = settings(max_examples=150, deadline=None)
TINY32 = float(np.finfo(np.float32).smallest_normal)

DTYPES = st.sampled_from(["float64", "float32"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
BITWISE_BACKENDS = st.sampled_from(["numpy", "array_api_strict"])


def namespace(name):
    return np if name == "numpy" else pytest.importorskip(name)


def arrays(dtype, shape, bound, *, nonneg=False):
    """Finite arrays with |x| <= bound (no subnormals, so float32 squares do not silently flush)."""
    width = 64 if dtype == "float64" else 32
    lo = 0.0 if nonneg else -bound
    return hnp.arrays(dtype, shape, elements=st.floats(lo, bound, width=width, allow_subnormal=False))


def bits(a):
    a = np.asarray(a)
    return a.view(np.int64 if a.dtype == np.float64 else np.int32)


def assert_same_bits(a, b, msg=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=msg)


# ------------------------------------------------------------------------------------------ strategies

@st.composite
def hyperparams(draw, paradigm=None):
    direction = draw(st.sampled_from(["adam", "sgd"]))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.0, 0.999))
    nesterov = draw(st.booleans()) if momentum > 0 else False
    return HyperParams(
        direction=direction,
        beta1=draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.999)),
        beta2=draw(st.sampled_from([0.0, 0.999]) | st.floats(0.0, 0.9999)),
        eps=draw(st.sampled_from([1e-8]) | st.floats(1e-12, 1e-2)),
        momentum=momentum, nesterov=nesterov,
        paradigm=paradigm or draw(st.sampled_from(["scratch", "finetune", "none"])),
        rollback_max=1.0,
    )


@st.composite
def problems(draw, dtype=None, bound=None, paradigm=None):
    """One tensor's inputs for a few consecutive steps."""
    dtype = dtype or draw(DTYPES)
    bound = bound or (2.0**330 if dtype == "float64" else 2.0**50)  # ~1e99, ~1e15: exact in the dtype
    shape = draw(SHAPES)
    hp = draw(hyperparams(paradigm))
    n_steps = draw(st.integers(1, 3))
    return dict(
        dtype=dtype, shape=shape, hp=hp,
        theta=draw(arrays(dtype, shape, bound)),
        anchor=draw(arrays(dtype, shape, bound)),
        grads=[draw(arrays(dtype, shape, bound)) for _ in range(n_steps)],
        t0=draw(st.sampled_from([0, 1]) | st.integers(0, 10_000)),
        lrs=[draw(st.sampled_from([0.0, 1e-3, 1.0]) | st.floats(0.0, 1.0)) for _ in range(n_steps)],
        rho=draw(st.sampled_from([0.0, 1.0, 1e6]) | st.floats(0.0, 100.0)),
    )


def run_core(p, xp):
    theta = from_numpy(xp, p["theta"])
    anchor = from_numpy(xp, p["anchor"])
    state = dc.init_direction_state(theta, p["hp"].direction, xp=xp)
    out = []
    for i, (g, lr) in enumerate(zip(p["grads"], p["lrs"])):
        theta, state = dc.step_tensor(theta, from_numpy(xp, g), state, anchor, hp=p["hp"], lr=lr,
                                      step=p["t0"] + i + 1, rate=p["rho"], xp=xp)
        out.append((to_numpy(theta), [to_numpy(s) for s in state]))
    return out


def run_spec(p, dtype=None):
    dtype = dtype or p["dtype"]
    theta = p["theta"].astype(dtype)
    anchor = p["anchor"].astype(dtype)
    zeros = np.zeros(p["theta"].shape, dtype)
    state = (zeros, zeros) if p["hp"].direction == "adam" else (zeros,)
    out = []
    for i, (g, lr) in enumerate(zip(p["grads"], p["lrs"])):
        theta, _, state = spec_step(theta, g.astype(dtype), state, anchor, hp=p["hp"], lr=lr, t=p["t0"] + i + 1,
                                    rho=p["rho"])
        out.append((theta, list(state)))
    return out


# ------------------------------------------------------------------------------------------- the pull

def exact(x) -> Fraction:
    return Fraction(float(x))


@PROPERTY
@given(dtype=DTYPES, shape=SHAPES, data=st.data(),
       c=st.sampled_from([0.0, 1.0, 0.5, 1 - 2**-53]) | st.floats(0.0, 1.0))
def test_pull_never_overshoots_the_anchor(dtype, shape, data, c):
    """theta = pre - c*(pre - a) lies between pre and a and is no farther from a than pre.

    Exactly so whenever pre - a is computed exactly (always for the scratch form with a = 0, and
    whenever pre and a are within a factor of two of each other, Sterbenz); otherwise the rounding
    of pre - a may carry theta past the anchor by at most ~2 ulps of max(|pre|, |a|)."""
    bound = float(np.finfo(dtype).max) / 4  # pre - a must not overflow
    pre = data.draw(arrays(dtype, shape, bound), label="pre")
    anchor = data.draw(arrays(dtype, shape, bound), label="anchor")
    theta = dc.pull(pre, anchor, c, xp=np)
    scratch = dc.pull(pre, None, c, xp=np)
    assert theta.shape == pre.shape and theta.dtype == pre.dtype
    eps = float(np.finfo(dtype).eps)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    for p, a, th, sc in zip(pre.reshape(-1), anchor.reshape(-1), theta.reshape(-1), scratch.reshape(-1)):
        P, A, T, S = exact(p), exact(a), exact(th), exact(sc)
        # Scratch form (a = 0): p - c*p never leaves [0, p].
        assert min(P, 0) <= S <= max(P, 0) and abs(S) <= abs(P)
        lo, hi = min(P, A), max(P, A)
        if exact(p - a) == P - A:
            assert lo <= T <= hi, (p, a, c, th)
            assert abs(T - A) <= abs(P - A)
        else:
            tol = Fraction(4 * eps * max(abs(float(p)), abs(float(a))) + tiny)
            assert lo - tol <= T <= hi + tol, (p, a, c, th)
            assert abs(T - A) <= abs(P - A) + tol


def test_clipped_pull_lands_on_the_anchor_up_to_rounding():
    """Spec 4.2: with c = 1 the result is the anchor up to the rounding of pre - a and of the
    final subtraction (pre = 1, a = 1e-30 gives 0 because 1 - 1e-30 rounds to 1)."""
    pre = np.array([1.0, 0.1, -3.0, 2.0])
    anchor = np.array([1e-30, 0.3, 5.0, 2.0])
    out = dc.pull(pre, anchor, 1.0, xp=np)
    bound = np.spacing(np.abs(pre - anchor)) + 0.5 * np.spacing(np.abs(anchor))
    assert np.all(np.abs(out - anchor) <= bound)
    assert out[0] == 0.0  # the documented example
    assert_same_bits(out[1:], anchor[1:])  # pre and a within a factor 2 or equal: exact


# ------------------------------------------------------------------- agreement with the spec's formula

@PROPERTY
@given(p=problems(), backend=BITWISE_BACKENDS)
def test_step_tensor_matches_independent_spec_evaluation(p, backend):
    """Same dtype, same op order: the core and the formula written above agree bit for bit."""
    core = run_core(p, namespace(backend))
    spec = run_spec(p)
    for step, ((th, st_core), (th_ref, st_ref)) in enumerate(zip(core, spec), start=1):
        assert_same_bits(th, th_ref, f"theta after step {step}")
        for a, b in zip(st_core, st_ref):
            assert_same_bits(a, b, f"state after step {step}")


@PROPERTY
@given(p=problems(dtype="float32", bound=1e3))
def test_float32_step_is_close_to_float64_evaluation(p):
    """float32 results stay within a few float32 ulps of the same formula evaluated in float64.

    Magnitudes are bounded and tiny gradients flushed to 0 so that g*g neither overflows nor
    underflows in float32 (that would change the formula, not its rounding)."""
    p["grads"] = [np.where(np.abs(g) < 1e-15, np.float32(0), g) for g in p["grads"]]
    core = run_core(p, np)
    ref = run_spec(p, dtype="float64")
    u32 = float(np.finfo(np.float32).eps)
    hp = p["hp"]
    theta64 = p["theta"].astype(np.float64)
    scale = np.abs(theta64) + np.abs(p["anchor"].astype(np.float64))
    for (th32, _), (th64, st64), g, lr, i in zip(core, ref, p["grads"], p["lrs"], range(len(core))):
        # The magnitude of everything that entered theta so far bounds its rounding error.
        if hp.direction == "adam":
            t = p["t0"] + i + 1
            m, v = st64
            d = np.sqrt(v) / math.sqrt(1.0 - hp.beta2 ** t) + hp.eps
            step_mag = lr / (1.0 - hp.beta1 ** t) * (np.abs(m) + np.abs(g)) / d
        else:
            step_mag = lr * (np.abs(st64[0]) + np.abs(g)) * (1.0 + hp.momentum)
        scale = scale + np.abs(th64) + step_mag
        err = np.abs(th32.astype(np.float64) - th64)
        # Plus float32's underflow: a learning rate of 1e-308 is a valid float64 host scalar whose
        # float32 products round to 0 (or a subnormal), an absolute error no relative bound covers.
        bound = 16 * u32 * scale + 16 * TINY32
        assert np.all(err <= bound), (err.max(initial=0), bound.min(initial=0))


# ------------------------------------------------------------------------------------- rho = 0

@PROPERTY
@given(p=problems(), backend=BITWISE_BACKENDS, anchor_is_nan=st.booleans())
def test_zero_rate_is_plain_adam_or_sgd(p, backend, anchor_is_nan):
    """rho = 0 (any paradigm) or lr = 0 gives exactly the direction's pre-weight; the anchor is never read."""
    p["rho"] = 0.0
    if anchor_is_nan:
        p["anchor"] = np.full(p["anchor"].shape, np.nan, p["dtype"])
    core = run_core(p, namespace(backend))
    plain = run_spec({**p, "hp": p["hp"].replace(paradigm="none")})
    for (th, _), (th_ref, _) in zip(core, plain):
        assert_same_bits(th, th_ref)


@PROPERTY
@given(p=problems())
def test_zero_learning_rate_leaves_theta_unchanged(p):
    """lr = 0 leaves every value in place (a -0.0 may become +0.0: -0.0 - (0 * negative) is +0.0 in IEEE)."""
    p["lrs"] = [0.0] * len(p["lrs"])
    for th, _ in run_core(p, np):
        assert th.dtype == p["theta"].dtype and th.shape == p["theta"].shape
        np.testing.assert_array_equal(th, p["theta"])


# ----------------------------------------------------------------------------------------- finiteness

@PROPERTY
@given(p=problems(), backend=st.sampled_from(["numpy", "array_api_strict", "torch"]))
def test_finite_inputs_give_finite_outputs(p, backend):
    """Finite theta, anchor, gradients and valid hyperparameters (eps > 0) never produce NaN or Inf."""
    if backend == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp
    else:
        xp = namespace(backend)
    for th, state in run_core(p, xp):
        assert th.shape == p["theta"].shape and th.dtype == p["theta"].dtype
        assert np.all(np.isfinite(th))
        for s in state:
            assert s.shape == p["theta"].shape and np.all(np.isfinite(s))
