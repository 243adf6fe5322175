"""Fuzzing the rule (hypothesis): the core and every adapter against an independent reading of the spec.

``tests/common/fuzz_spec.py`` restates SPEC sections 3-5 (layer rates, the rule, host
scalars) without calling ``decoupled_core``. Each example is a whole optimizer:
1-4 tensors of random shapes (0-d and zero-size included), float64, float32,
float16 or bfloat16, each with its own hyperparameters anywhere in their valid
ranges (the pull bound ``eta_0 * rho <= 1`` included), random layer keys,
explicit anchors, 1-3 steps whose learning rate may drop to 0 or exceed
``eta_0`` (then ``c`` is clipped to 1), gradients from tiny to huge, and
tensors without a gradient in some steps. Checked:

(a) the result equals the spec evaluated in the param's compute dtype bit for
    bit (float16/bfloat16: float32 arithmetic, one rounding back, float32
    state), and stays within a derived bound of the spec evaluated entirely in
    float64;
(b) the pull never carries a tensor past its anchor (or past zero) by more
    than SPEC 4.2's rounding allowance;
(c) with rho = 0 (paradigm none, weight_decay 0, rollback 0) the core and
    ``dualopt.torch`` equal ``torch.optim.Adam`` / ``torch.optim.SGD`` (float64,
    CPU) within float64 round-off;
(d) finite inputs give finite parameters and state.

The core runs on numpy and array-api-strict (jax.numpy for float16/bfloat16,
which array-api-strict lacks); ``dualopt.torch`` (fast and reference paths),
``dualopt.optax`` and ``dualopt.keras`` (in ``test_keras_lowprec``'s
worker process) run the same examples through their single-step paths. Every
test uses :func:`tests.common.fuzz_spec.profile`: a fixed number of derandomized examples.

Magnitudes stay where the rule cannot overflow (``|x| <= max/8``; gradients
``<= sqrt(max)/8`` of the compute dtype, so that ``g * g`` is finite), and
values below ``2**24`` times the smallest normal are flushed to zero (a
subnormal moment loses relative precision in the lower precision only, which
is the arithmetic's doing, not the rule's).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import decoupled_core as dc
from tests.common import fuzz_spec as fz
from tests.common.fuzz_spec import Problem, profile
from tests.keras import _lowprec_fuzz as _keras_lowprec_fuzz

EXAMPLES = 60  # per test; derandomized, so every run checks the same examples
#: The largest error seen per check, in units of its tolerance's scale (printed: the margin of each bound).
WORST: dict[str, float] = {}


def _record(name: str, used: dict[str, float]) -> None:
    for key, value in used.items():
        WORST[f"{name} {key}"] = max(WORST.get(f"{name} {key}", 0.0), value)


def _margins(name: str) -> str:
    return ", ".join(f"{k[len(name) + 1:]} uses {v:.2g} of its bound" for k, v in WORST.items() if k.startswith(name))


def _ratio(err: np.ndarray, unit: np.ndarray) -> float:
    err, unit = np.broadcast_arrays(np.asarray(err, np.float64), np.asarray(unit, np.float64))
    mask = err > 0
    return float(np.max(err[mask] / unit[mask], initial=0.0)) if mask.any() else 0.0


# ----------------------------------------------------------------------------------------- namespaces

def namespace(name: str):
    if name == "numpy":
        return np
    if name == "jax.numpy":
        pytest.importorskip("jax")
        import jax.numpy as jnp

        return jnp
    return pytest.importorskip(name)


def to_xp(xp, a: np.ndarray):
    if xp is np:
        return a.copy()
    return xp.asarray(np.array(a, copy=True))


def to_np(x) -> np.ndarray:
    if type(x).__module__.startswith("array_api_strict"):
        return np.from_dlpack(x).copy()
    return np.array(x, copy=True)


def core_trajectory(p: Problem, xp) -> tuple[list[list[np.ndarray]], list[list[list[np.ndarray]]], dc.ReferenceOptimizer]:
    """Params (param dtype) and states after every step, from :class:`decoupled_core.ReferenceOptimizer`."""
    hps = [dc.HyperParams(**g.core_kwargs()) for g in p.groups]
    opt = dc.ReferenceOptimizer([to_xp(xp, t) for t in p.theta], hps, base_lr=p.base_lr, layer_index=p.layer_index,
                                anchors=[to_xp(xp, a) for a in p.anchor], xp=xp)
    params, states = [], []
    for row, lr in zip(p.grads, p.lrs):
        assert opt.step([None if g is None else to_xp(xp, g) for g in row], lr)
        params.append([to_np(x) for x in opt.params])
        states.append([[to_np(s) for s in st_] for st_ in opt.states])
    return params, states, opt


# ----------------------------------------------------------------------------------------- (a), (d): core

# array-api-strict has no float16/bfloat16 and numpy no bfloat16: bfloat16 runs on eager jax.numpy
# (correctly rounded like numpy, but compiled per shape: a few fixed shapes, fewer examples).
CORE_CASES = [("numpy", ("float64", "float32", "float16")), ("array_api_strict", ("float64", "float32")),
              ("jax.numpy", ("bfloat16",))]


@pytest.mark.parametrize("backend,dtypes", CORE_CASES, ids=[c[0] for c in CORE_CASES])
def test_core_equals_the_spec_and_stays_near_float64(backend, dtypes):
    xp = namespace(backend)
    shapes = fz.FEW_SHAPES if backend == "jax.numpy" else fz.SHAPES
    ran = []

    @profile(EXAMPLES if backend != "jax.numpy" else EXAMPLES // 3)
    @given(p=fz.problems(dtypes=dtypes, shapes=shapes))
    def body(p):
        p = fz.flushed(p, ftz=backend == "jax.numpy")
        params, states, opt = core_trajectory(p, xp)
        assert opt.rates == p.rates()  # SPEC 3, written independently: equal floats
        _record(f"core on {backend}", fz.check_against_spec(p, params, states, backend))
        ran.append(p.dtype)

    with _x64(backend):
        body()
    assert len(ran) >= 15, ran
    print(f"\n[fuzz] core on {backend}: {len(ran)} examples ({ {d: ran.count(d) for d in sorted(set(ran))} }); "
          f"{_margins(f'core on {backend}')}")


def _x64(backend: str):
    """float64 available on jax inside the test only (a context manager: other suites keep their setting)."""
    if backend.startswith("jax"):
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- (b) overshoot

@pytest.mark.parametrize("backend,dtypes", CORE_CASES, ids=[c[0] for c in CORE_CASES])
def test_pull_never_overshoots_the_anchor(backend, dtypes):
    """Each step's result against the core's own pre-weight (the same step with rate 0, in the compute
    dtype) and the anchor (0 for scratch): SPEC 4.2's interval plus its rounding allowance."""
    xp = namespace(backend)
    shapes = fz.FEW_SHAPES if backend == "jax.numpy" else fz.SHAPES
    ran = []

    @profile(EXAMPLES if backend != "jax.numpy" else EXAMPLES // 3)
    @given(p=fz.problems(dtypes=dtypes, shapes=shapes, max_tensors=2),
           pull=st.sampled_from(["strong", "clipped", "any"]))
    def body(p, pull):
        p = fz.flushed(p, ftz=backend == "jax.numpy")
        if pull != "any":  # drive c towards 1, and past it (clipped)
            p.lrs = [p.base_lr * (1.0 if pull == "strong" else 3.0)] * len(p.lrs)
        hps = [dc.HyperParams(**g.core_kwargs()) for g in p.groups]
        opt = dc.ReferenceOptimizer([to_xp(xp, t) for t in p.theta], hps, base_lr=p.base_lr,
                                    layer_index=p.layer_index, anchors=[to_xp(xp, a) for a in p.anchor], xp=xp)
        compute = fz.compute_name(p.dtype)
        cdt = getattr(xp, compute)
        for row, lr in zip(p.grads, p.lrs):
            before = [(xp.astype(x, cdt), s, t) for x, s, t in zip(opt.params, opt.states, opt.steps)]
            opt.step([None if g is None else to_xp(xp, g) for g in row], lr)
            for i, g in enumerate(row):
                if g is None:
                    continue
                theta_c, state, t = before[i]
                pre, _ = dc.step_tensor(theta_c, xp.astype(to_xp(xp, g), cdt), state, None, hp=hps[i], lr=lr,
                                        step=t + 1, rate=0.0, xp=xp)
                a = p.anchor[i] if p.groups[i].paradigm == "finetune" else np.zeros_like(p.anchor[i])
                ok, why = fz.overshoot_ok(to_np(opt.params[i]), to_np(pre), a, compute, p.dtype)
                assert ok, (backend, p.dtype, i, why)
        ran.append(pull)

    with _x64(backend):
        body()
    assert len(ran) >= 15
    print(f"\n[fuzz] overshoot on {backend}: {len(ran)} examples")


def test_the_overshoot_check_takes_an_overflow_of_the_params_dtype():
    """A float16 param whose compute-dtype (float32) result lies beyond float16's range rounds to an infinity:
    accepted on the side where the interval's end overflows too, refused elsewhere. (Hypothesis drew such a
    step, beta2 = 0 then a zero gradient: an update of 9e5.)"""
    f16, f32 = np.float16, np.float32
    assert fz.overshoot_ok(np.array(-np.inf, f16), np.array(-9e5, f32), np.array(0.0, f16), "float32", "float16")[0]
    assert not fz.overshoot_ok(np.array(np.inf, f16), np.array(-9e5, f32), np.array(0.0, f16), "float32", "float16")[0]
    assert not fz.overshoot_ok(np.array(-np.inf, f16), np.array(-6e4, f32), np.array(0.0, f16), "float32", "float16")[0]
    assert not fz.overshoot_ok(np.array(-np.inf, f32), np.array(-9e5, f32), np.array(0.0, f32), "float32", "float32")[0]
    assert fz.overshoot_ok(np.array(-1.5, f16), np.array(-2.0, f32), np.array(0.0, f16), "float32", "float16")[0]


# ----------------------------------------------------------------------------------------- (c) rho = 0

@st.composite
def zero_pull_problems(draw):
    p = draw(fz.problems(dtypes=("float64",), max_steps=5, allow_missing=False, first_lr_is_base=True))
    g0 = p.groups[0]
    zero = draw(st.sampled_from([dict(paradigm="none"), dict(paradigm="scratch", weight_decay=0.0),
                                 dict(paradigm="finetune", rollback_max=0.0, rollback_min=0.0)]))
    p.groups = [fz.Group(**{**g0.core_kwargs(), **zero})] * len(p.shapes)  # one group, as torch.optim has
    return p


def _torch_native(p: Problem, torch):
    g = p.groups[0]
    params = [torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in p.theta]
    if g.direction == "adam":
        opt = torch.optim.Adam(params, lr=p.base_lr, betas=(g.beta1, g.beta2), eps=g.eps, foreach=False)
    else:
        opt = torch.optim.SGD(params, lr=p.base_lr, momentum=g.momentum, nesterov=g.nesterov, dampening=0.0,
                              foreach=False)
    return params, opt


def _dualopt_torch(p: Problem, torch, foreach):
    from dualopt.torch import DualOpt

    g = p.groups[0]
    params = [torch.tensor(t, requires_grad=True) for t in p.theta]
    opt = DualOpt(params, lr=p.base_lr, direction=g.direction, betas=(g.beta1, g.beta2), eps=g.eps,
                  momentum=g.momentum, nesterov=g.nesterov, paradigm=g.paradigm, weight_decay=g.weight_decay,
                  rollback_max=g.rollback_max, rollback_min=g.rollback_min, foreach=foreach)
    return params, opt


def test_zero_pull_equals_torch_optim(one_torch_thread):
    """(c) torch.optim on CPU float64 is the independent reference. It evaluates the same method in another
    order (lerp for m, division by sqrt(bc2), addcdiv/add with alpha, torch's sqrt is not correctly rounded),
    so agreement is to round-off: 8 unit roundoffs per step of the running magnitude (|theta| plus the
    updates so far, per element). Measured: 1.5 roundoffs at worst on these examples."""
    torch = pytest.importorskip("torch")
    ran = []

    @profile(EXAMPLES)
    @given(p=zero_pull_problems())
    def body(p):
        p = fz.flushed(p)
        native, native_opt = _torch_native(p, torch)
        runs = {f"dualopt.torch foreach={foreach}": _dualopt_torch(p, torch, foreach) for foreach in (False, None)}
        core_params, _, opt = core_trajectory(p, np)
        assert opt.rates == [0.0] * len(p.shapes)
        scale = [np.abs(t.astype(np.float64)) for t in p.theta]
        prev = [t.astype(np.float64) for t in p.theta]
        for k, (row, lr) in enumerate(zip(p.grads, p.lrs)):
            for ps, o in runs.values():
                for group in o.param_groups:
                    group["lr"] = lr
                for x, gr in zip(ps, row):
                    x.grad = torch.from_numpy(gr.copy())
                o.step()
            for group in native_opt.param_groups:
                group["lr"] = lr
            for x, gr in zip(native, row):
                x.grad = torch.from_numpy(gr.copy())
            native_opt.step()
            for i in range(len(p.shapes)):
                ref = native[i].detach().numpy()
                scale[i] = scale[i] + np.abs(ref - prev[i]) + np.abs(ref)
                prev[i] = ref.copy()
                bound = 8 * (k + 1) * fz.U["float64"] * scale[i]
                results = {"core": core_params[k][i]}
                results.update({n: ps[i].detach().numpy() for n, (ps, _) in runs.items()})
                for name, got in results.items():
                    assert np.all(np.isfinite(got)), name
                    err = np.abs(got - ref)
                    assert np.all(err <= bound), (name, k, i, err.max(initial=0), bound.min(initial=0))
                    WORST["rho=0 vs torch.optim"] = max(WORST.get("rho=0 vs torch.optim", 0.0),
                                                        _ratio(err, fz.U["float64"] * scale[i]))
        ran.append(p.groups[0].direction)

    body()
    assert len(ran) >= 20
    print(f"\n[fuzz] rho=0 vs torch.optim: worst error {WORST.get('rho=0 vs torch.optim', 0):.2f} unit roundoffs "
          f"of the scale (bound: 8 per step); {len(ran)} examples ({ {d: ran.count(d) for d in set(ran)} })")


# ----------------------------------------------------------------------------------------- adapters

def _torch_dtype(torch, name: str):
    return getattr(torch, name)


def _torch_from_np(torch, a: np.ndarray, name: str):
    if name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)  # exact: bfloat16 -> float32 -> bfloat16
    return torch.from_numpy(a.copy())


def _torch_to_np(t, name: str) -> np.ndarray:
    t = t.detach()
    if name == "bfloat16":
        return t.to(__import__("torch").float32).numpy().astype(fz.np_dtype("bfloat16"))
    return t.numpy().copy()


@pytest.mark.parametrize("foreach", [False, None], ids=["reference", "fast"])
def test_torch_adapter_steps_match_the_spec(foreach, one_torch_thread):
    """``dualopt.torch.DualOpt``, one param group per tensor (its own hyperparameters and layer key),
    explicit anchors, per-step learning rates, tensors without a gradient. Tolerance: TOLERANCES.md's
    ``torch`` class (torch's CPU sqrt is not correctly rounded), 4 eps per step of the running scale;
    the fused Adam fast path evaluates the formula in another order: ``FAST_PATH_TOLERANCE`` (16) eps per
    step. float16/bfloat16 add one ulp of the param dtype per step (a float32 difference can flip a tie)."""
    torch = pytest.importorskip("torch")
    from dualopt.torch import DualOpt
    from dualopt.conformance.tolerances import FAST_PATH_TOLERANCE

    ran = []

    @profile(EXAMPLES)
    @given(p=fz.problems(first_lr_is_base=True))
    def body(p):
        p = fz.flushed(p)
        params = [torch.nn.Parameter(_torch_from_np(torch, t, p.dtype)) for t in p.theta]
        keys = p.layer_index if p.layer_index is not None else list(range(len(params)))
        groups = [{"params": [x], "layer_index": [key], "direction": g.direction, "betas": (g.beta1, g.beta2),
                   "eps": g.eps, "momentum": g.momentum, "nesterov": g.nesterov, "paradigm": g.paradigm,
                   "weight_decay": g.weight_decay, "rollback_max": g.rollback_max, "rollback_min": g.rollback_min,
                   "rollback_power": g.rollback_power} for x, key, g in zip(params, keys, p.groups)]
        anchors = [_torch_from_np(torch, a, p.dtype) for a in p.anchor]
        opt = DualOpt(groups, lr=p.base_lr, anchor=anchors, foreach=foreach)
        out_p, out_s = [], []
        for row, lr in zip(p.grads, p.lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            for x, g in zip(params, row):
                x.grad = None if g is None else _torch_from_np(torch, g, p.dtype)
            opt.step()
            out_p.append([_torch_to_np(x, p.dtype) for x in params])
            states = []
            for x, g in zip(params, p.groups):
                st_ = opt.state[x]
                keys_ = ("exp_avg", "exp_avg_sq") if g.direction == "adam" else ("momentum_buffer",)
                zeros = [np.zeros(x.shape, fz.np_dtype(fz.compute_name(p.dtype)))] * len(keys_)
                states.append([st_[k].numpy().copy() for k in keys_] if keys_[0] in st_ else zeros)
            out_s.append(states)
        adam = any(g.direction == "adam" for g in p.groups)
        tol = FAST_PATH_TOLERANCE if (foreach is None and adam) else 4.0
        _record(f"dualopt.torch foreach={foreach}",
                fz.check_against_spec(p, out_p, out_s, f"dualopt.torch foreach={foreach}", exact=False, tol_ulps=tol))
        ran.append(p.dtype)

    body()
    assert len(ran) >= 20
    print(f"\n[fuzz] dualopt.torch foreach={foreach}: {len(ran)} examples "
          f"({ {d: ran.count(d) for d in sorted(set(ran))} }); {_margins(f'dualopt.torch foreach={foreach}')}")


def test_optax_adapter_steps_equal_the_spec_bitwise():
    """``dualopt.optax`` through :func:`dualopt.optax.step` (eager, x64 on): per-leaf settings as lists,
    explicit anchors, the learning rate as a schedule over the steps. Eager jax is correctly rounded and the
    transform computes the scalars as the host does (``adam_scalars``), so the results equal the spec
    bit for bit in every dtype (float16/bfloat16: float32 state, one rounding back)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    from dualopt.optax import dualopt, step

    ran = []

    @profile(EXAMPLES // 2)
    @given(p=fz.problems(shapes=fz.FEW_SHAPES, allow_missing=False, first_lr_is_base=True, max_tensors=3))
    def body(p):
        p = fz.flushed(p, ftz=True)
        lrs = jnp.asarray(p.lrs + [0.0], jnp.float64)
        col = lambda f: [getattr(g, f) for g in p.groups]  # noqa: E731
        tx = dualopt(lambda count: lrs[count], direction=col("direction"), b1=col("beta1"), b2=col("beta2"),
                     eps=col("eps"), momentum=col("momentum"), nesterov=col("nesterov"), paradigm=col("paradigm"),
                     weight_decay=col("weight_decay"), rollback_max=col("rollback_max"),
                     rollback_min=col("rollback_min"), rollback_power=col("rollback_power"),
                     layer_index=p.layer_index, anchor=[jnp.asarray(a) for a in p.anchor])
        params = [jnp.asarray(t) for t in p.theta]
        state = tx.init(params)
        out_p, out_s = [], []
        for row in p.grads:
            params, state = step(tx, [jnp.asarray(g) for g in row], state, params)
            out_p.append([np.asarray(x) for x in params])
            out_s.append([[np.asarray(state.mu[i])] + ([np.asarray(state.nu[i])] if g.direction == "adam" else [])
                          for i, g in enumerate(p.groups)])
        _record("dualopt.optax", fz.check_against_spec(p, out_p, out_s, "dualopt.optax"))
        ran.append(p.dtype)

    with jax.enable_x64(True):
        body()
    assert len(ran) >= 15
    print(f"\n[fuzz] dualopt.optax: {len(ran)} examples ({ {d: ran.count(d) for d in sorted(set(ran))} }); "
          f"{_margins('dualopt.optax')}")


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend", _keras_lowprec_fuzz.keras_backends())
def test_keras_adapter_steps_match_the_spec(backend):
    """``dualopt.keras.DualOpt.apply`` on fuzzed examples, in the worker process of
    ``test_keras_lowprec`` (one per backend): TOLERANCES.md's ``traced-scalars`` class."""
    from tests.keras._lowprec_fuzz import keras_result

    r = keras_result(backend, "fuzz")
    assert r["failure"] is None, r["failure"]
    assert r["examples"] >= 10, r
    print(f"\n[fuzz] dualopt.keras[{backend}]: {r['examples']} examples ({r['dtypes']}); "
          + ", ".join(f"{k} uses {v:.2g} of its bound" for k, v in r["bound_used"].items()))
