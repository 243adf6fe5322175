"""The fuzz suite's evaluation of the spec and its hypothesis strategies.

Nothing here calls ``decoupled_core``: the layer rates and the rule come from
:mod:`tests.common.oracle` (the tests' one independent reading of SPEC
sections 3-5), so the fuzz tests compare two independent readings of the
spec. Framework-free (numpy, ml_dtypes for the bfloat16 rounding,
hypothesis), so the Keras subprocess can import it too.

``evaluate`` runs one tensor's trajectory in a chosen compute precision:
float64 (the reference every precision is held to), or the spec's own
compute dtype (float32 for float16/bfloat16 params, followed by one rounding
to the param dtype), which every namespace must reproduce bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.common.oracle import Group, layer_rates, spec_step  # noqa: F401  (the fuzz tests use fz.Group)


#: The fuzz profile: a fixed number of examples, derandomized (the same examples on every run and
#: machine, so CI is deterministic), no deadline (first calls compile), no example database.
def profile(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


LOW = ("float16", "bfloat16")
NP_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(NP_DTYPES[name])


def compute_name(name: str) -> str:
    """SPEC section 6: float16/bfloat16 compute in float32, others in their own dtype."""
    return "float32" if name in LOW else name


def finfo(name: str) -> Any:
    return ml_dtypes.finfo(NP_DTYPES[name]) if name == "bfloat16" else np.finfo(NP_DTYPES[name])


# --------------------------------------------------------------------------------------- evaluation

@dataclass
class Trajectory:
    theta: list[np.ndarray] = field(default_factory=list)  # after each step, in the param dtype
    pre: list[np.ndarray] = field(default_factory=list)  # pre-weights, in the compute precision
    state: list[tuple] = field(default_factory=list)  # in the compute precision


def evaluate(theta0: np.ndarray, anchor: np.ndarray, grads: list[np.ndarray | None], lrs: list[float], *, hp: Group,
             rho: float, t0: int = 0, precision: str = "spec") -> Trajectory:
    """One tensor's trajectory. ``precision="spec"``: the compute dtype of the param's dtype, one rounding
    back per step; ``"float64"``: everything in float64 (no rounding back, the exact-ish reference).
    ``None`` gradients skip the step (the tensor's t does not advance)."""
    own = theta0.dtype
    name = {np.dtype(v): k for k, v in NP_DTYPES.items()}[own]
    cdt = np.float64 if precision == "float64" else np_dtype(compute_name(name))
    theta = theta0.astype(cdt)
    a = anchor.astype(cdt)
    zeros = np.zeros(theta0.shape, cdt)
    state = (zeros, zeros.copy()) if hp.direction == "adam" else (zeros,)
    out = Trajectory()
    t = t0
    for g, lr in zip(grads, lrs):
        if g is None:
            out.theta.append(out.theta[-1] if out.theta else theta0.copy())
            out.pre.append(out.pre[-1] if out.pre else theta)
            out.state.append(state)
            continue
        t += 1
        new, pre, state = spec_step(theta, g.astype(cdt), state, a, hp=hp, lr=lr, t=t, rho=rho)
        theta = new if precision == "float64" else new.astype(own).astype(cdt)
        out.theta.append(new if precision == "float64" else new.astype(own))
        out.pre.append(pre)
        out.state.append(state)
    return out


# --------------------------------------------------------------------------------------------- comparisons

def bits(a: Any) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(f"u{a.dtype.itemsize}")


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def spacing(x: Any, name: str) -> np.ndarray:
    """ulp of ``|x|`` rounded to dtype ``name`` (the gap to the next float away from zero), as float64."""
    x = np.abs(np.asarray(x, np.float64)).astype(np_dtype(name))
    if name == "bfloat16":  # ml_dtypes has no np.spacing: step the bit pattern
        up = (x.view(np.uint16) + np.uint16(1)).view(ml_dtypes.bfloat16)
        return up.astype(np.float64) - x.astype(np.float64)
    return np.spacing(x).astype(np.float64)


def overshoot_ok(theta: Any, pre: Any, anchor: Any, compute: str, own: str) -> tuple[bool, str]:
    """SPEC 4.2: theta lies between the pre-weight and the anchor, up to one ulp of ``|pre - a|`` plus half
    an ulp of the result (in the compute dtype), plus half an ulp of the param dtype for the final rounding
    of float16/bfloat16 params. Checked in exact rational arithmetic."""
    th = np.asarray(theta).astype(np.float64).reshape(-1)
    p = np.asarray(pre).astype(np.float64).reshape(-1)
    a = np.asarray(anchor).astype(np.float64).reshape(-1)
    slack = spacing(np.abs(p - a), compute)
    with np.errstate(invalid="ignore"):  # the spacing of an infinite theta is NaN (handled below)
        allow = slack + 0.5 * spacing(th, compute)
        if own != compute:
            allow = allow + 0.5 * spacing(th, own)
    for x, lo_, hi_, tol, s in zip(th, np.minimum(p, a), np.maximum(p, a), allow, slack):
        if np.isinf(x) and own != compute and np.isfinite(s):
            # The compute dtype's result, rounded to a narrower param dtype, overflowed (a float16 step of
            # 9e5 with beta2 = 0 and a zero gradient): right where the interval's end rounds to that infinity.
            with np.errstate(over="ignore"):
                end = np.asarray(hi_ + s if x > 0 else lo_ - s, np.float64).astype(finfo(own).dtype)
            if end != x:
                return False, f"theta={x!r} but the interval [{lo_!r}, {hi_!r}] is finite in {own}"
            continue
        if not (np.isfinite(x) and np.isfinite(tol)):
            return False, f"theta={x!r} (tolerance {tol!r}): not finite"
        X, lo, hi, T = Fraction(float(x)), Fraction(float(lo_)), Fraction(float(hi_)), Fraction(float(tol))
        if not (lo - T <= X <= hi + T):
            return False, f"theta={x!r} outside [{lo_!r}, {hi_!r}] by more than {tol!r}"
    return True, ""


# --------------------------------------------------------------------------------------------- checks

U = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}  # unit roundoff of the compute dtypes


def flushed(p: Problem, ftz: bool = False) -> Problem:
    """Values below 2**24 * smallest normal of the compute dtype (and own subnormals) set to 0 (module doc).

    ``ftz``: the namespace flushes subnormal results to zero (XLA on CPU does), so also keep ``g * g``,
    ``(1 - b2) * g * g`` and ``(1 - b1) * g`` normal: values below ``2**16 * sqrt(smallest normal)``
    are set to 0, and so are the decay factors ``beta1``, ``beta2`` and ``momentum`` and the learning
    rates below that limit, whose products with a moment would be subnormal. A Nesterov group with such
    a momentum becomes plain momentum 0 (Nesterov needs momentum > 0; at momentum 0 both rules give u = g). Where numpy produces
    a subnormal, XLA produces 0: not the spec's IEEE arithmetic, and outside the domain of the "exact"
    class."""
    own = finfo(p.dtype)
    tiny = float(finfo(compute_name(p.dtype)).tiny)
    limit = max(tiny * 2.0 ** 24, float(own.tiny), math.sqrt(tiny) * 2.0 ** 16 if ftz else 0.0)
    f = lambda a: None if a is None else np.where(np.abs(a.astype(np.float64)) < limit, 0, a).astype(a.dtype)  # noqa: E731
    p.theta = [f(a) for a in p.theta]
    p.anchor = [f(a) for a in p.anchor]
    p.grads = [[f(g) for g in row] for row in p.grads]
    if ftz:
        z = lambda x: 0.0 if abs(x) < limit else x  # noqa: E731
        p.groups = [replace(g, beta1=z(g.beta1), beta2=z(g.beta2), momentum=z(g.momentum),
                            nesterov=g.nesterov and z(g.momentum) != 0.0) for g in p.groups]
        # A learning rate below the limit makes the step (and the pull's c) subnormal: XLA's 0, not the
        # spec's. Such a rate (1.4e-45) came up only when other tests had run first in the process
        # (seen after the conformance doctests; Hypothesis also draws constants from loaded modules).
        p.lrs = [z(lr) for lr in p.lrs]
    return p


def running_scale(p: Problem, i: int, ref64: Trajectory, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The magnitudes that entered tensor i up to step k, summed per element (|theta|, |anchor|, the update
    |pre - theta| and |pre|, from the float64 evaluation), and the sum of the param dtype's ulps of the
    results (float16/bfloat16 only, else 0)."""
    theta_prev = p.theta[i].astype(np.float64)
    anchor = np.abs(p.anchor[i].astype(np.float64))
    scale = np.abs(theta_prev) + anchor
    low = np.zeros(np.shape(theta_prev))
    for j in range(k + 1):
        th, pre = ref64.theta[j], ref64.pre[j]
        scale = scale + np.abs(pre - theta_prev) + np.abs(pre) + np.abs(th) + anchor
        if p.dtype in LOW:
            low = low + spacing(th, p.dtype)
        theta_prev = th
    return scale, low


def float64_bound(p: Problem, i: int, ref64: Trajectory, k: int) -> np.ndarray:
    """Bound on |result - float64 evaluation| for tensor i after step k (element-wise).

    Each step rounds at most 8 operations, each by at most half an ulp of its result, and all of those
    results are bounded by the running scale (:func:`running_scale`); 16 unit roundoffs of it leave a
    margin. float16/bfloat16 add one rounding to the param dtype per step (half an ulp of the result; one
    full ulp allowed, since a float32 difference can flip a tie). Results in the subnormal range are
    rounded on a fixed grid: 8 smallest subnormals per step, absolute. Measured on the suite's examples: the
    worst error uses 0.04-0.5 of this bound depending on namespace and dtype; the tests print the figure."""
    scale, low = running_scale(p, i, ref64, k)
    # A result in the subnormal range is rounded to a fixed grid: half its spacing, absolute, per operation.
    subnormal = 8 * (k + 1) * float(finfo(compute_name(p.dtype)).smallest_subnormal)
    return 16 * U[compute_name(p.dtype)] * scale + low + subnormal


def _used(err: np.ndarray, bound: np.ndarray) -> float:
    """The largest fraction of ``bound`` that ``err`` uses (0 where both are 0)."""
    err, bound = np.broadcast_arrays(np.asarray(err, np.float64), np.asarray(bound, np.float64))
    mask = err > 0
    return float(np.max(err[mask] / bound[mask], initial=0.0)) if mask.any() else 0.0


def check_against_spec(p: Problem, params, states, where: str, *, exact: bool = True,
                       tol_ulps: float | None = None) -> dict[str, float]:
    """(a) bitwise (or within ``tol_ulps`` eps of the running scale) vs the spec in the compute dtype,
    within the float64 bound vs the float64 evaluation; (d) finite; state dtypes per SPEC 6.

    Returns the largest fraction of each bound used (``"vs float64"``, and ``"vs spec"`` when not exact).
    States compared with a tolerance use their own running scale: the sum over steps of |state| and of
    the |gradient| (squared for ``v``) that entered it."""
    spec = p.expected("spec")
    ref64 = p.expected("float64")
    compute = np_dtype(compute_name(p.dtype))
    eps = float(finfo(compute_name(p.dtype)).eps)
    used = {"vs float64": 0.0, **({} if exact else {"vs spec": 0.0})}
    state_scale = [None] * len(p.shapes)
    for k in range(len(p.lrs)):
        for i in range(len(p.shapes)):
            got = params[k][i]
            msg = f"{where}: tensor {i} step {k + 1}"
            assert got.dtype == np_dtype(p.dtype) and got.shape == p.shapes[i], msg
            assert all(s.dtype == compute for s in states[k][i]), (msg, [s.dtype for s in states[k][i]])
            assert np.all(np.isfinite(got.astype(np.float64))), msg
            assert all(np.all(np.isfinite(s)) for s in states[k][i]), msg
            want = spec[i].theta[k]
            if exact:
                assert same_bits(got, want), (msg, got, want)
                for s, w in zip(states[k][i], spec[i].state[k]):
                    assert same_bits(s, w), (msg, s, w)
            else:
                scale, low = running_scale(p, i, ref64[i], k)
                bound = tol_ulps * eps * scale + low
                err = np.abs(got.astype(np.float64) - want.astype(np.float64))
                assert np.all(err <= bound), (msg, err.max(initial=0), got, want)
                used["vs spec"] = max(used["vs spec"], _used(err, bound))
                g = p.grads[k][i]
                g = np.zeros(p.shapes[i]) if g is None else np.abs(g.astype(np.float64))
                powers = (1, 2) if p.groups[i].direction == "adam" else (1,)
                add = [np.abs(w.astype(np.float64)) + g ** e for w, e in zip(spec[i].state[k], powers)]
                state_scale[i] = add if state_scale[i] is None else [a + b for a, b in zip(state_scale[i], add)]
                for s, w, sc in zip(states[k][i], spec[i].state[k], state_scale[i]):
                    serr = np.abs(s.astype(np.float64) - w.astype(np.float64))
                    sbound = tol_ulps * eps * sc
                    assert np.all(serr <= sbound), (msg, "state", serr.max(initial=0), s, w)
                    used["vs spec"] = max(used["vs spec"], _used(serr, sbound))
            err64 = np.abs(got.astype(np.float64) - ref64[i].theta[k])
            bound64 = float64_bound(p, i, ref64[i], k)
            assert np.all(err64 <= bound64), (msg, "vs float64", got, ref64[i].theta[k])
            used["vs float64"] = max(used["vs float64"], _used(err64, bound64))
    return used


# --------------------------------------------------------------------------------------------- strategies

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
#: A few shapes only, for namespaces that compile per shape (eager jax, Keras): 0-d, zero-size, small.
FEW_SHAPES = st.sampled_from([(), (0,), (3,), (2, 3)])


def magnitudes(name: str) -> st.SearchStrategy[float]:
    """Scales for values of dtype ``name``: tiny, ordinary and huge, staying where the rule cannot overflow
    (|x| <= max/8 so that pre - a is finite; gradients <= sqrt(max)/8 in the compute dtype so g*g is)."""
    if name == "float64":
        return st.sampled_from([1e-150, 1e-30, 1e-8, 1.0, 1e8, 1e30, 1e150])
    if name == "float32":
        return st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e18])
    if name == "float16":
        return st.sampled_from([1e-4, 1e-2, 1.0, 1e2, 6e3])  # above 6e-5: float16 normals
    return st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e18])  # bfloat16: float32's range


@st.composite
def arrays(draw: Any, name: str, shape: tuple, scale: float | None = None) -> np.ndarray:
    scale = scale if scale is not None else draw(magnitudes(name))
    unit = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1.0, 1.0, allow_subnormal=False)))
    return (unit * scale).astype(np_dtype(name))


@st.composite
def groups(draw: Any, base_lr: float, paradigm: str | None = None) -> Group:
    """Hyperparameters anywhere in their valid ranges (SPEC section 2), the pull bound included."""
    direction = draw(st.sampled_from(["adam", "sgd"]))
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.999))
    cap = 0.999999 / base_lr  # lr * rho_max <= 1 (base_lr > 0)
    kmax = draw(st.sampled_from([0.0, min(cap, 1e3)]) | st.floats(0.0, min(cap, 1e3)))
    return Group(
        direction=direction,
        beta1=draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.999)),
        beta2=draw(st.sampled_from([0.0, 0.999]) | st.floats(0.0, 0.9999)),
        eps=draw(st.sampled_from([1e-8]) | st.floats(1e-10, 1e-2)),
        momentum=momentum, nesterov=draw(st.booleans()) if momentum > 0 else False,
        paradigm=paradigm or draw(st.sampled_from(["scratch", "finetune", "none"])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, min(cap, 1e3)]) | st.floats(0.0, min(cap, 1e3))),
        rollback_max=kmax,
        rollback_min=draw(st.floats(0.0, kmax)) if kmax > 0 else 0.0,
        rollback_power=draw(st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.05, 8.0)),
    )


@dataclass
class Problem:
    """Several tensors of one optimizer, a few steps: the inputs of one fuzz example."""

    dtype: str
    shapes: list[tuple]
    groups: list[Group]
    layer_index: list[int] | None
    base_lr: float
    theta: list[np.ndarray]
    anchor: list[np.ndarray]
    grads: list[list[np.ndarray | None]]  # per step, per tensor
    lrs: list[float]

    def rates(self) -> list[float]:
        return layer_rates(self.groups, self.layer_index)

    def expected(self, precision: str = "spec") -> list[Trajectory]:
        rates = self.rates()
        return [evaluate(self.theta[i], self.anchor[i], [g[i] for g in self.grads], self.lrs, hp=self.groups[i],
                         rho=rates[i], precision=precision) for i in range(len(self.shapes))]


@st.composite
def problems(draw: Any, dtypes=("float64", "float32", "float16", "bfloat16"), shapes=SHAPES, max_tensors: int = 4,
             max_steps: int = 3, allow_missing: bool = True, first_lr_is_base: bool = False,
             one_group: bool = False) -> Problem:
    dtype = draw(st.sampled_from(list(dtypes)))
    n = draw(st.integers(1, max_tensors))
    tensor_shapes = [draw(shapes) for _ in range(n)]
    base_lr = draw(st.sampled_from([1e-3, 0.1, 1.0]) | st.floats(1e-6, 1.0))
    if one_group:  # one set of hyperparameters (Keras), paradigms still per tensor
        g0 = draw(groups(base_lr))
        gs = [Group(**{**g0.core_kwargs(), "paradigm": draw(st.sampled_from(["scratch", "finetune", "none"]))})
              for _ in range(n)]
    else:
        gs = [draw(groups(base_lr)) for _ in range(n)]
    layer_index = draw(st.none() | st.lists(st.integers(0, 5), min_size=n, max_size=n))
    steps = draw(st.integers(1, max_steps))
    scale_t, scale_g = draw(magnitudes(dtype)), draw(magnitudes(dtype))
    theta = [draw(arrays(dtype, s, scale_t)) for s in tensor_shapes]
    anchor = [draw(arrays(dtype, s, draw(magnitudes(dtype)))) for s in tensor_shapes]
    grads = []
    for _ in range(steps):
        row = []
        for s in tensor_shapes:
            missing = allow_missing and draw(st.integers(0, 5)) == 0
            row.append(None if missing else draw(arrays(dtype, s, scale_g)))
        grads.append(row)
    # A schedule may move eta_t above eta_0 (then c is clipped to 1, spec 4.2), or to 0.
    lrs = [draw(st.sampled_from([base_lr, 0.0, 2 * base_lr]) | st.floats(0.0, 2 * base_lr)) for _ in range(steps)]
    if first_lr_is_base:  # eta_0 is what construction validates (and what optax's schedule(0) returns)
        lrs[0] = base_lr
    return Problem(dtype, tensor_shapes, gs, layer_index, base_lr, theta, anchor, grads, lrs)


@dataclass
class Counter:
    """Counts the examples a fuzz test really ran (reported by the suite's summary)."""

    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
