"""Every Keras check that needs a backend, batched into one process per backend.

:func:`run_all` is launched by ``test_keras_backends.py`` (``_launcher``, with
``JAX_ENABLE_X64=1``) once per backend, which asserts on the JSON it returns
(importing Keras with a backend costs 5-7 s, so the checks share one process).
Each check records measured values (max differences, counters, flags); the
pytest side decides pass or fail, so a broken check shows its numbers.

Exact gradients: the fit checks use a model whose loss is linear in its
outputs, ``mean_i sum_j t_ij * y_ij`` with ``y = D0(x0) + D1(x1) + head(x2)``.
The gradients (``x_k^T t / B`` and ``sum(t) / B``) do not depend on the
weights, and with small-integer data and a power-of-two batch they are exact in
float64 whatever the summation order, so
:class:`decoupled_core.ReferenceOptimizer` can replay exactly the gradients
Keras's compiled train step used. They are exact in float32 too, so Keras
3.15's float64-to-float32 demotion on jax and torch (``keras.layers.Dense``
and the loss reduction compute in float32 there; keras-team/keras#23704)
cannot move them: ``gradients_exact`` checks Keras's gradients bit for bit,
``keras_xp_float64`` that DualOpt's own ops keep float64, and
``conformance_model_float64`` that the conformance closed loop's model (which
is not exact) computes in float64 on every backend.
"""

from __future__ import annotations

import doctest
import hashlib
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

import numpy as np

if os.environ.get("KERAS_BACKEND") == "tensorflow":
    # Two logical CPU devices for the MirroredStrategy check (only possible before TensorFlow starts).
    import tensorflow as tf

    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402  (backend chosen by KERAS_BACKEND)
from keras import ops

_FRAMEWORKS = {"jax", "torch", "tensorflow"}
_LOADED_BY_KERAS = _FRAMEWORKS & {m.split(".")[0] for m in sys.modules}
import dualopt.keras  # noqa: E402,F401
_LOADED_BY_DUALOPT = (_FRAMEWORKS & {m.split(".")[0] for m in sys.modules}) - _LOADED_BY_KERAS

from decoupled_core import HyperParams, ReferenceOptimizer
from dualopt.conformance.impl_keras import replay_case, _supported
from dualopt.spec.vectors import load_cases

BACKEND = keras.backend.backend()
B = 8  # batch size (power of two: exact gradients)
N = 32  # samples: 4 batches per epoch
IN = (4, 3, 5)  # input widths of the three Dense layers
OUT = 3
LR = 0.01
PATHS = ("backbone_0/kernel", "backbone_0/bias", "backbone_1/kernel", "backbone_1/bias", "head/kernel", "head/bias")
RESULTS: dict[str, Any] = {"backend": BACKEND}
FLOAT32_CASES = ("adam_finetune_p1", "mixed_groups", "nonfinite_skip", "sgd_nesterov_mixed")


@keras.saving.register_keras_serializable(package="dualopt_tests")
def linear_loss(y_true: Any, y_pred: Any) -> Any:
    return ops.sum(y_true * y_pred, axis=-1)


@keras.saving.register_keras_serializable(package="dualopt_tests")
def head_scratch(variable: Any) -> str | None:
    return "scratch" if "head" in variable.path else None


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> None:
        t0 = time.perf_counter()
        try:
            RESULTS[fn.__name__] = fn()
        except Exception:  # recorded, then asserted on by pytest
            RESULTS[fn.__name__] = {"error": traceback.format_exc()[-3000:]}
        RESULTS.setdefault("seconds", {})[fn.__name__] = round(time.perf_counter() - t0, 2)

    CHECKS[fn.__name__] = run
    return fn


CHECKS: dict[str, Callable[[], None]] = {}


# ----------------------------------------------------------------------------- helpers
def data(seed: int = 0, nan_batch: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = [rng.integers(-3, 4, size=(N, w)).astype(np.float64) for w in IN]
    t = rng.integers(-2, 3, size=(N, OUT)).astype(np.float64)
    if nan_batch is not None:
        xs[1][nan_batch * B + 1, 2] = np.nan
    return xs, t


def initial_weights(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {}
    for name, width in zip(("backbone_0", "backbone_1", "head"), IN):
        w[f"{name}/kernel"] = rng.standard_normal((width, OUT))
        w[f"{name}/bias"] = 0.1 * rng.standard_normal((OUT,))
    return w


def make_model(weights: dict[str, np.ndarray]) -> Any:
    keras.config.set_floatx("float64")
    inputs = [keras.Input((w,), dtype="float64", name=f"x{i}") for i, w in enumerate(IN)]
    outs = [keras.layers.Dense(OUT, name=n)(x) for n, x in zip(("backbone_0", "backbone_1", "head"), inputs)]
    model = keras.Model(inputs, keras.layers.Add()(outs))
    paths = [v.path for v in model.trainable_variables]
    if tuple(paths) != PATHS:
        raise RuntimeError(f"unexpected variable order {paths}")
    for v in model.trainable_variables:
        v.assign(weights[v.path])
    return model


def exact_grads(xs: list[np.ndarray], t: np.ndarray, epochs: int) -> list[list[np.ndarray]]:
    steps = []
    for _ in range(epochs):
        for k in range(N // B):
            sl = slice(k * B, (k + 1) * B)
            tb = t[sl] / B
            g = []
            for x in xs:
                g += [x[sl].T @ tb, tb.sum(axis=0)]
            steps.append(g)
    return steps


def weights_of(model: Any) -> list[np.ndarray]:
    return [np.array(ops.convert_to_numpy(v)) for v in model.trainable_variables]


def fit(model: Any, opt: Any, xs: list[np.ndarray], t: np.ndarray, epochs: int, per_epoch: list | None = None) -> None:
    callbacks = []
    if per_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: per_epoch.append(weights_of(model))))
    model.compile(optimizer=opt, loss=linear_loss)
    model.fit(xs, t, batch_size=B, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def mixed_hps(**kw: Any) -> list[HyperParams]:
    ft = HyperParams(paradigm="finetune", **{k: v for k, v in kw.items() if k != "weight_decay"})
    sc = HyperParams(paradigm="scratch", **{k: v for k, v in kw.items() if not k.startswith("rollback")})
    return [ft, ft, ft, ft, sc, sc]


def reference(weights: dict[str, np.ndarray], hps: list[HyperParams], grads: list[list[np.ndarray]],
              lrs: list[float], base_lr: float = LR, **kw: Any) -> tuple[ReferenceOptimizer, list[list[np.ndarray]]]:
    opt = ReferenceOptimizer([weights[p].copy() for p in PATHS], hps, base_lr=base_lr, xp=np, **kw)
    traj = []
    for g, lr in zip(grads, lrs):
        opt.step(g, lr)
        traj.append([p.copy() for p in opt.params])
    return opt, traj


def diff(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    """Bitwise flag and ``max|a - b| / max|b|`` per tensor (worst tensor), in units of float64 eps."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.size:
            scale = max(float(np.max(np.abs(y))), np.finfo(np.float64).tiny)
            worst = max(worst, float(np.max(np.abs(x - y))) / scale / np.finfo(np.float64).eps)
    return {"bitwise": all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b)), "max_err_eps": worst}


def dualopt(**kw: Any) -> Any:
    from dualopt.keras import DualOpt

    return DualOpt(**kw)


# ----------------------------------------------------------------------------- checks
@check
def vectors() -> dict[str, Any]:
    """Spec vectors through optimizer.apply, against the expected trajectories.

    Every float64 case, and a few float32 cases (the conformance suite replays
    them all; eager per-op dispatch makes the full set slow on jax and tf).
    """
    out = {}
    for case in load_cases():
        key = f"{case.name}.{case.dtype}"
        if case.dtype == "float32" and case.name not in FLOAT32_CASES:
            continue
        if not _supported(case):
            out[key] = "unsupported"
            continue
        traj = replay_case(case)
        worst_abs, worst_rel, bitwise = 0.0, 0.0, True
        for got, exp in zip(traj, case.expected):
            for n in case.names:
                a, e = got[n].astype(np.float64), exp[n].astype(np.float64)
                bitwise &= bool(np.array_equal(got[n], exp[n], equal_nan=True))
                if a.size:
                    scale = max(float(np.max(np.abs(np.nan_to_num(e)))), 1e-30)
                    worst_abs = max(worst_abs, float(np.nanmax(np.abs(a - e))) / scale)
                    nan_ok = np.array_equal(np.isnan(a), np.isnan(e))
                    worst_rel = worst_rel if nan_ok else float("inf")
        out[key] = {"bitwise": bitwise, "max_err_over_scale": worst_abs, "nan_pattern_ok": worst_rel == 0.0,
                    "sha256": hashlib.sha256(b"".join(s[n].tobytes() for s in traj for n in case.names)).hexdigest()}
    return out


@check
def fast_path_equals_generic() -> dict[str, Any]:
    """torch only: the fast path against the per-variable generic path.

    With Adam on the core's lists (``Policy(fused_adam=False)``) and for SGD,
    bit for bit; with torch's fused Adam kernel (the default), the error over
    the generic path's scale, in the dtype's epsilon (the test bounds it).
    """
    if BACKEND != "torch":
        return {"skipped": "torch backend only"}
    import torch

    from dualopt.keras._torch import Policy

    defaults, lists = Policy(), Policy(fused_adam=False)
    out: dict[str, Any] = {}
    for case in load_cases():
        if not _supported(case):
            continue
        generic = replay_case(case, fast_path=False)
        for name, policy in (("lists", lists), ("fused", defaults)):
            fast = replay_case(case, fast_path=True, policy=policy)
            out[f"vector:{name}:{case.name}.{case.dtype}"] = _compare_outputs(
                [f[n] for f in fast for n in case.names], [g[n] for g in generic for n in case.names],
                len(case.grads))

    def as_torch(g: np.ndarray, dt: str, transposed: bool) -> Any:
        if transposed and g.ndim == 2:  # a non-contiguous gradient of the right shape
            return torch.as_tensor(np.ascontiguousarray(g.T)).to(getattr(torch, dt)).T
        return torch.as_tensor(g).to(getattr(torch, dt))

    def compare(shapes: list, dtype: str, direction: str, nesterov: bool, paradigm: Any, layer_index: list,
                steps: int, inf_at: tuple, transposed: bool, policy: Policy) -> dict[str, Any]:
        results = []
        for fast_path in (True, False):
            keras.config.set_floatx("float32" if dtype != "float64" else "float64")
            dts = [("float16" if (dtype == "mixed16" and i % 3 == 0) else
                    ("float32" if dtype == "mixed16" else dtype)) for i in range(len(shapes))]
            local = np.random.default_rng(11)
            vs = [keras.Variable(local.standard_normal(s).astype(dt), dtype=dt, name=f"v{i}")
                  for i, (s, dt) in enumerate(zip(shapes, dts))]
            opt = dualopt(learning_rate=0.05, direction=direction, nesterov=nesterov, paradigm=paradigm,
                          default_paradigm="finetune", weight_decay=0.7, rollback_max=3.0, rollback_min=0.5,
                          layer_index=layer_index)
            opt._use_fast_path = fast_path
            opt._fast_path_policy = policy
            for step in range(steps):
                grads = [local.standard_normal(s) for s in shapes]
                if step == 3:
                    grads[inf_at[0]][inf_at[1]] = np.inf
                opt.learning_rate = 0.05 * (1 + step % 2)
                opt.apply([as_torch(g, dt, transposed) for g, dt in zip(grads, dts)], vs)
            results.append([np.array(ops.convert_to_numpy(v)) for v in vs]
                           + [np.array(ops.convert_to_numpy(v)) for v in opt.variables])
        return _compare_outputs(results[0], results[1], steps)

    shapes = [(7, 5), (5,), (3, 4, 2), (), (0, 3), (16,), (9, 9), (1,)]
    mixed = {"v1": "scratch", "v5": "none", "v6": "scratch"}
    # "whole": every tensor fits one piece (fused Adam, and the lists); "pieces": the lists in tiny pieces and
    # batches, so that tensors are split, batches cut through tensors and a gradient is non-contiguous. The
    # NaN/Inf check is torch_lists's, tested in tests/torch/test_torch_lists.py; "large" below runs its sum
    # route, and there a non-contiguous gradient takes the lists beside the fused kernel in one group.
    for mode, policy in (("whole", defaults), ("whole-lists", lists),
                         ("pieces", Policy(chunk_elems=5, batch_elems=17, fused_adam=False))):
        for dtype in ("float32", "float64", "mixed16"):
            for direction, nesterov in (("adam", False), ("sgd", True), ("sgd", False)):
                for paradigm in ("scratch", "finetune", "none", "mixed"):
                    key = f"random:{mode}:{dtype}:{direction}{'+nesterov' if nesterov else ''}:{paradigm}"
                    out[key] = compare(shapes, dtype, direction, nesterov, mixed if paradigm == "mixed"
                                       else paradigm, [0, 0, 1, 2, 2, 3, 4, 4], 6, (2, (0, 1, 1)),
                                       mode == "pieces", policy)
    # Real sizes: several pieces per tensor, batches across tensors (the lists), and the fused kernel.
    big = [(300, 700), (3 * defaults.chunk_elems + 7,), (5,), (defaults.batch_elems - 3,)]
    for dtype, direction in (("float32", "adam"), ("float64", "sgd")):
        for name, policy in (("fused", defaults), ("lists", lists)):
            out[f"large:{name}:{dtype}:{direction}"] = compare(big, dtype, direction, True, {"v1": "scratch"},
                                                               [0, 1, 2, 3], 5, (0, (299, 699)), True, policy)
    keras.config.set_floatx("float64")
    return out


def _compare_outputs(got: list[np.ndarray], want: list[np.ndarray], steps: int) -> dict[str, Any]:
    """Bitwise flag, NaN pattern and ``max|got - want| / max|want|`` (worst array, in its dtype's eps)."""
    worst = 0.0
    for x, y in zip(got, want):
        if not np.issubdtype(y.dtype, np.floating):  # counters must agree exactly
            worst = worst if np.array_equal(x, y) else float("inf")
            continue
        finite = np.isfinite(y)
        if x.size and finite.any():
            scale = max(float(np.max(np.abs(y[finite]))), np.finfo(np.float64).tiny)
            err = float(np.max(np.abs(x[finite].astype(np.float64) - y[finite])))
            worst = max(worst, err / scale / float(np.finfo(y.dtype).eps))
    return {"bitwise": all(np.array_equal(x, y, equal_nan=True) for x, y in zip(got, want)),
            "nan_pattern_ok": all(np.array_equal(np.isfinite(x), np.isfinite(y)) for x, y in zip(got, want)),
            "max_err_eps": worst, "steps": steps}


@check
def fast_path_gradient_shapes() -> dict[str, Any]:
    """torch only: gradients whose shape is not the variable's, through the default fast path and the
    per-variable path. torch's fused kernel checks no sizes, so such a gradient must never reach it."""
    if BACKEND != "torch":
        return {"skipped": "torch backend only"}
    import torch

    out: dict[str, Any] = {}
    for name, grad in (("broadcast", torch.linspace(-1.0, 2.0, 3)), ("mismatch", torch.ones(3, 4)),
                       ("fewer_elements", torch.ones(2, 3))):
        got = []
        for fast_path in (True, False):
            keras.config.set_floatx("float32")
            v = keras.Variable(np.ones((4, 3), "float32"), name="w")
            opt = dualopt(learning_rate=0.1, paradigm="finetune", rollback_max=1.0)
            opt._use_fast_path = fast_path
            try:
                opt.apply([grad], [v])
                got.append(("applied", np.array(ops.convert_to_numpy(v)).tolist()))
            except Exception as exc:  # recorded: both paths must raise the same kind of error
                got.append(("raised", type(exc).__name__))
        out[name] = {"fast": got[0], "generic": got[1]}
    keras.config.set_floatx("float64")
    return out


@check
def update_step_uses_its_learning_rate() -> dict[str, Any]:
    """``update_step`` steps with the learning rate it is given (Keras's ``apply`` passes it) and t = step + 1."""
    from decoupled_core import AdamState, step_tensor

    w0, g = np.array([1.0, -2.0, 3.0]), np.array([0.5, -0.25, 1.0])
    out = {}
    for lr in (0.03, 0.1):  # 0.1 is the optimizer's own rate
        w = keras.Variable(w0, dtype="float64", name="w")
        opt = dualopt(learning_rate=0.1, paradigm="finetune", rollback_max=2.0)
        opt.build([w])
        opt.update_step(ops.convert_to_tensor(g), w, lr)
        hp = HyperParams(direction="adam", paradigm="finetune", rollback_max=2.0)
        expected, _ = step_tensor(w0, g, AdamState(np.zeros(3), np.zeros(3)), w0, hp=hp, lr=lr, step=1,
                                  rate=opt.layer_rates()["w"], xp=np)
        out[str(lr)] = {"max_err_eps": float(np.max(np.abs(np.asarray(ops.convert_to_numpy(w)) - expected))
                                             / np.max(np.abs(expected)) / 2.0**-52),
                        "step_count": int(ops.convert_to_numpy(opt.step_count))}
    return out


@check
def fit_matches_reference() -> dict[str, Any]:
    """Compiled fit (float64, backbone finetune / head scratch in one line) vs the core replaying its gradients.

    Also the anchor trap: after several epochs the anchors must still be the pre-fit weights.
    """
    w0 = initial_weights()
    xs, t = data()
    epochs = 3
    model = make_model(w0)
    opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                  weight_decay=0.5, rollback_max=4.0)
    per_epoch: list = []
    fit(model, opt, xs, t, epochs, per_epoch)
    grads = exact_grads(xs, t, epochs)
    ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
    steps = N // B
    anchors = {p: np.array(ops.convert_to_numpy(a)) for p, a in opt.anchors().items()}
    return {
        "per_epoch": [diff(got, traj[(e + 1) * steps - 1]) for e, got in enumerate(per_epoch)],
        "step_count": int(ops.convert_to_numpy(opt.step_count)),
        "iterations": int(ops.convert_to_numpy(opt.iterations)),
        "expected_steps": len(grads),
        "anchor_paths": sorted(anchors),
        "anchors_equal_prefit": all(np.array_equal(anchors[p], w0[p]) for p in anchors),
        "anchors_differ_from_current": all(not np.array_equal(anchors[p], w) for p, w in
                                           zip(PATHS, weights_of(model)) if p in anchors),
        "jit_compile": str(getattr(model, "jit_compile", None)),
    }


@check
def fit_nonfinite_skip_with_ema() -> dict[str, Any]:
    """A NaN batch inside the compiled train step, with use_ema.

    The skipped step changes no weight, moment, anchor, t or EMA average;
    ``skipped`` counts it and ``iterations`` advances. Per-epoch weights are the
    raw trajectory; after fit Keras replaces them by the EMA average.
    """
    w0 = initial_weights(2)
    xs, t = data(3, nan_batch=2)
    epochs = 2
    model = make_model(w0)
    opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune", rollback_max=4.0,
                  weight_decay=0.5, use_ema=True, ema_momentum=0.9)
    per_epoch: list = []
    fit(model, opt, xs, t, epochs, per_epoch)
    grads = exact_grads(xs, t, epochs)
    ref = ReferenceOptimizer([w0[p].copy() for p in PATHS], mixed_hps(weight_decay=0.5, rollback_max=4.0),
                             base_lr=LR, xp=np)
    traj, average = [], None
    for i, g in enumerate(grads):
        if ref.step(g, LR):
            # Keras's EMA: momentum 0 on the first apply (iterations == 0), then ema_momentum.
            momentum = float(i != 0) * 0.9
            average = [p.copy() if average is None else momentum * a + (1 - momentum) * p
                       for a, p in zip(average or ref.params, ref.params)]
        traj.append([p.copy() for p in ref.params])
    steps = N // B
    return {
        "per_epoch": [diff(got, traj[(e + 1) * steps - 1]) for e, got in enumerate(per_epoch)],
        "ema_weights": diff(weights_of(model), average),
        "ema_differs_from_params": diff(average, ref.params)["max_err_eps"],
        "skipped": int(ops.convert_to_numpy(opt.skipped)), "expected_skipped": ref.skipped,
        "step_count": int(ops.convert_to_numpy(opt.step_count)), "expected_step_count": len(grads) - ref.skipped,
        "iterations": int(ops.convert_to_numpy(opt.iterations)), "expected_iterations": len(grads),
    }


@check
def save_load_continue() -> dict[str, Any]:
    """fit 2 epochs, save .keras, load_model, fit 2 more == fit 4 epochs uninterrupted (weights and state)."""
    w0 = initial_weights(4)
    xs, t = data(5)

    def make_opt() -> Any:
        return dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                       rollback_max=4.0, weight_decay=0.5, layer_index="layer")

    straight = make_model(w0)
    fit(straight, make_opt(), xs, t, 4)
    first = make_model(w0)
    fit(first, make_opt(), xs, t, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        first.save(path)
        loaded = keras.models.load_model(path)
    loaded_type = type(loaded.optimizer).__name__
    loaded.fit(xs, t, batch_size=B, epochs=2, shuffle=False, verbose=0)
    opt_a, opt_b = straight.optimizer, loaded.optimizer
    state_equal = len(opt_a.variables) == len(opt_b.variables) and all(
        np.array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b)) for a, b in zip(opt_a.variables,
                                                                                         opt_b.variables))
    return {"loaded_optimizer": loaded_type, "weights": diff(weights_of(loaded), weights_of(straight)),
            "optimizer_state_equal": state_equal, "n_optimizer_variables": len(opt_b.variables),
            "optimizer_name": opt_b.name, "saved_optimizer_name": first.optimizer.name,
            "slot_names": [v.path for v in opt_b.variables]}


@check
def learning_rate_schedules() -> dict[str, Any]:
    """A LearningRateSchedule: the reference uses lr_t = schedule(t - 1) evaluated eagerly."""
    out = {}
    xs, t = data(6)
    epochs = 3
    grads = exact_grads(xs, t, epochs)
    for name, sched in (("piecewise", keras.optimizers.schedules.PiecewiseConstantDecay([3, 7], [0.02, 0.01, 0.004])),
                        ("exponential", keras.optimizers.schedules.ExponentialDecay(0.02, 4, 0.5))):
        w0 = initial_weights(7)
        model = make_model(w0)
        opt = dualopt(learning_rate=sched, paradigm={"head": "scratch"}, default_paradigm="finetune",
                      weight_decay=0.5)
        fit(model, opt, xs, t, epochs)
        lrs = [float(ops.convert_to_numpy(sched(i))) for i in range(len(grads))]
        rollback_max = 0.01 / float(ops.convert_to_numpy(sched(0)))
        ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=rollback_max), grads, lrs, base_lr=lrs[0])
        out[name] = {"weights": diff(weights_of(model), traj[-1]), "rollback_max": opt.rollback_max,
                     "expected_rollback_max": rollback_max, "lrs": lrs[:8]}
    # A float learning rate set by a callback between epochs (keras.callbacks.LearningRateScheduler).
    w0 = initial_weights(7)
    model = make_model(w0)
    opt = dualopt(learning_rate=0.02, paradigm={"head": "scratch"}, default_paradigm="finetune", weight_decay=0.5)
    model.compile(optimizer=opt, loss=linear_loss)
    per_epoch = lambda epoch: 0.02 * 0.5**epoch  # noqa: E731
    model.fit(xs, t, batch_size=B, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.LearningRateScheduler(per_epoch)])
    lrs = [per_epoch(i // (N // B)) for i in range(len(grads))]
    ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=0.01 / 0.02), grads, lrs, base_lr=0.02)
    out["callback"] = {"weights": diff(weights_of(model), traj[-1]), "rollback_max": opt.rollback_max,
                       "expected_rollback_max": 0.01 / 0.02, "lrs": lrs[::N // B]}
    return out


def _clip_norm(g: np.ndarray, c: float) -> np.ndarray:
    l2 = np.sqrt(np.sum(g * g))
    return g * c / max(l2, c)


def _clip_global(gs: list[np.ndarray], c: float) -> list[np.ndarray]:
    norm = np.sqrt(np.sum(np.stack([np.sum(g * g) for g in gs])))
    scale = c * min(1.0 / norm, 1.0 / c) + (norm - norm)
    return [g * scale for g in gs]


@check
def clipping() -> dict[str, Any]:
    """clipnorm and global_clipnorm: the reference replays the gradients Keras's clipping produces.

    ``keras_clip_vs_numpy_formula`` records how far Keras's clipping is from its
    formula in float64 numpy: on the torch backend (Keras 3.15)
    ``ops.maximum(float64 tensor, python float)`` returns float32, so the
    clipped gradients carry float32 rounding there.
    """
    out = {}
    xs, t = data(8)
    epochs = 2
    grads = exact_grads(xs, t, epochs)
    for key, kwargs, clip in (("clipnorm", {"clipnorm": 0.75}, lambda gs: [_clip_norm(g, 0.75) for g in gs]),
                              ("global_clipnorm", {"global_clipnorm": 1.25}, lambda gs: _clip_global(gs, 1.25))):
        w0 = initial_weights(9)
        model = make_model(w0)
        opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                      rollback_max=4.0, weight_decay=0.5, **kwargs)
        fit(model, opt, xs, t, epochs)
        # Replay exactly the gradients Keras's own clipping produces on this backend (eagerly).
        clipped = [[np.array(ops.convert_to_numpy(c)) for c in opt._clip_gradients([ops.convert_to_tensor(x) for x in g])]
                   for g in grads]
        numpy_clipped = [clip(g) for g in grads]
        ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), clipped, [LR] * len(grads))
        _, unclipped = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
        out[key] = {"weights": diff(weights_of(model), traj[-1]),
                    "keras_clip_vs_numpy_formula": max(diff(a, b)["max_err_eps"] for a, b in zip(clipped, numpy_clipped)),
                    "clipping_mattered": diff(traj[-1], unclipped[-1])["max_err_eps"]}
    return out


@check
def gradient_accumulation() -> dict[str, Any]:
    """gradient_accumulation_steps=2: one update per two batches with the mean gradient; t counts updates."""
    w0 = initial_weights(10)
    xs, t = data(11)
    epochs = 2
    model = make_model(w0)
    opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune", rollback_max=4.0,
                  weight_decay=0.5, gradient_accumulation_steps=2)
    fit(model, opt, xs, t, epochs)
    grads = exact_grads(xs, t, epochs)
    merged = [[(b + a) / 2 for a, b in zip(grads[k], grads[k + 1])] for k in range(0, len(grads), 2)]
    ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), merged, [LR] * len(merged))
    return {"weights": diff(weights_of(model), traj[-1]),
            "step_count": int(ops.convert_to_numpy(opt.step_count)), "expected_step_count": len(merged),
            "iterations": int(ops.convert_to_numpy(opt._iterations)), "expected_iterations": len(grads)}


def keras_gradients(model: Any, loss_fn: Callable[[Any, Any], Any], xs: Any, y: Any) -> tuple[list[np.ndarray], str]:
    """The gradient of ``loss_fn(y, model(xs))`` as this backend computes it, and (jax) the jaxpr's text."""
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        others = [v.value for v in model.non_trainable_variables]

        def f(tv: Any) -> Any:
            out, _ = model.stateless_call(tv, others, xs)
            return loss_fn(y, out)

        text = str(jax.make_jaxpr(jax.value_and_grad(f))(trainable))
        return [np.asarray(g) for g in jax.grad(f)(trainable)], text
    if BACKEND == "torch":
        import torch

        for v in model.trainable_variables:
            v.value.grad = None
        loss = loss_fn(torch.as_tensor(y), model([torch.as_tensor(x) for x in xs] if isinstance(xs, list)
                                                 else torch.as_tensor(xs)))
        loss.backward()
        return [v.value.grad.detach().numpy().copy() for v in model.trainable_variables], ""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn(tf.constant(y), model(xs))
    return [g.numpy() for g in tape.gradient(loss, [v.value for v in model.trainable_variables])], ""


def _fit_loss() -> Any:
    """The loss ``compile(loss=linear_loss)`` gives ``fit``: Keras's wrapper, batch-mean reduction included."""
    from keras.src.losses.losses import LossFunctionWrapper  # what compile wraps a function in (not public)

    return LossFunctionWrapper(linear_loss)


@check
def gradients_exact() -> dict[str, Any]:
    """The fit checks' gradients, as Keras computes them, are bitwise the exact ones replayed to the core.

    Keras 3.15 computes part of a "float64" Dense model in float32 on jax and
    torch (``dualopt.keras``, "Float64 models"); these gradients are exact in
    float32 as well, so that demotion cannot move them, and the fit checks
    compare the optimizer alone.
    """
    xs, t = data()
    model = make_model(initial_weights())
    got, _ = keras_gradients(model, _fit_loss(), [x[:B] for x in xs], t[:B])
    want = exact_grads(xs, t, 1)[0]
    return {"bitwise": all(np.array_equal(g, w) for g, w in zip(got, want)),
            "dtypes": sorted({str(g.dtype) for g in got})}


@check
def conformance_model_float64() -> dict[str, Any]:
    """The conformance closed loop's Keras model really computes in float64 here.

    ``impl_keras.float64_layers`` against the hand-written numpy backprop of
    the same MLP (errors relative to each gradient's largest element, float64
    round-off is ~1e-15; float32 would be ~1e-7), and on jax no float32 in
    the jaxpr of the loss and its gradient. The same MLP from
    ``keras.layers.Dense`` and ``SparseCategoricalCrossentropy`` is recorded
    for comparison (Keras's float32 demotion on jax and torch), not asserted.
    """
    from dualopt.conformance.impl_keras import build_problem_model, float64_layers
    from dualopt.conformance.problem import NAMES, SIZES, loss_and_grads_numpy, make_problem

    problem = make_problem()
    x, y = problem.x[:32], problem.y[:32]
    ref_loss, ref = loss_and_grads_numpy(problem.weights, x, y)

    def rel(got: list[np.ndarray]) -> float:
        return max(float(np.max(np.abs(g - ref[n])) / np.max(np.abs(ref[n]))) for g, n in zip(got, NAMES))

    _, loss = float64_layers()
    got, jaxpr = keras_gradients(build_problem_model(problem), loss(), x, y)
    inputs = keras.Input((SIZES[0],), dtype="float64")
    h = inputs
    for i, width in enumerate(SIZES[1:]):
        h = keras.layers.Dense(width, activation="tanh" if i < 2 else None, name=f"dense_{i}")(h)
    plain = keras.Model(inputs, h)
    for v in plain.trainable_variables:
        v.assign(problem.weights[v.path])
    plain_got, _ = keras_gradients(plain, keras.losses.SparseCategoricalCrossentropy(from_logits=True), x, y)
    return {"grad_rel_err": rel(got), "dtypes": sorted({str(g.dtype) for g in got}),
            "jaxpr_has_f32": "f32" in jaxpr, "jaxpr_has_f64": "f64" in jaxpr,
            "keras_dense_grad_rel_err": rel(plain_got),
            "keras_result_type_float64": keras.backend.result_type("float64", "float64")}


@check
def keras_xp_float64() -> dict[str, Any]:
    """Every keras.ops call of dualopt's update keeps float64 (Keras demotes many others on jax/torch)."""
    from dualopt.keras._xp import KERAS_XP as xp

    rng = np.random.default_rng(3)
    a = rng.uniform(0.1, 2.0, 257)
    x = ops.convert_to_tensor(a, dtype="float64")
    flag = ops.convert_to_tensor(True)
    results = {
        "sqrt": (xp.sqrt(x), np.sqrt(a)),
        "clip": (xp.clip(x * 0.7, 0.0, 1.0), np.clip(a * 0.7, 0.0, 1.0)),
        "astype": (xp.astype(x, "float64", copy=True), a),
        "cast": (ops.cast(x, "float64"), a),
        "copy": (ops.copy(x), a),
        "where": (ops.where(flag, x, x * 2.0), a),
        "operators": (x * 0.1 + x / 3.0 - x, a * 0.1 + a / 3.0 - a),
    }
    out = {}
    for name, (got, want) in results.items():
        g = np.asarray(ops.convert_to_numpy(got))
        out[name] = {"dtype": keras.backend.standardize_dtype(got.dtype),
                     "max_rel_err": float(np.max(np.abs(g - want) / np.abs(want)))}
    out["isfinite_all"] = bool(ops.convert_to_numpy(xp.all(xp.isfinite(x))))
    return out


def _fit_reference_case(opt: Any, weights: dict[str, np.ndarray], seed: int, epochs: int, **fit_kw: Any
                        ) -> tuple[Any, list[np.ndarray], list[list[np.ndarray]]]:
    """fit ``opt`` on the exact-gradient model; (model, final weights, exact gradients)."""
    xs, t = data(seed)
    model = make_model(weights)
    model.compile(optimizer=opt, loss=linear_loss, **fit_kw)
    model.fit(xs, t, batch_size=B, epochs=epochs, shuffle=False, verbose=0)
    return model, weights_of(model), exact_grads(xs, t, epochs)


@check
def anchor_trap() -> dict[str, Any]:
    """FIELD_NOTES' TensorFlow trap, tested on every backend and way of compiling the train step.

    TensorFlow builds the optimizer while it traces the train step, so an
    anchor assigned in ``build()`` would be reset to the current weights on
    every step and the pull would vanish. After 12 steps the anchors must still
    be the pre-fit weights and the weights must match the core replaying the
    same gradients with pre-fit anchors (a vanished pull moves them by ~1e13 eps).
    ``default`` is Keras's ``jit_compile="auto"``: XLA on jax, a plain
    ``tf.function`` on tensorflow's CPU, eager on torch.
    """
    variants = {"default": {}, "no_jit": {"jit_compile": False}, "eager": {"run_eagerly": True}}
    if BACKEND != "torch":  # torch's jit_compile=True is torch.compile, not a trace of this train step
        variants["xla"] = {"jit_compile": True}
    out = {}
    w0 = initial_weights(21)
    for key, kw in variants.items():
        opt = dualopt(learning_rate=LR, paradigm="finetune", rollback_max=20.0)
        built_before = bool(opt.built)
        model, got, grads = _fit_reference_case(opt, w0, 22, 3, **kw)
        hps = [HyperParams(paradigm="finetune", rollback_max=20.0)] * len(PATHS)
        _, traj = reference(w0, hps, grads, [LR] * len(grads))
        _, no_pull = reference(w0, [HyperParams(paradigm="none")] * len(PATHS), grads, [LR] * len(grads))
        anchors = {p: np.array(ops.convert_to_numpy(a)) for p, a in opt.anchors().items()}
        out[key] = {"built_before_fit": built_before, "jit_compile": str(model.jit_compile),
                    "anchors_equal_prefit": sorted(anchors) == sorted(PATHS) and all(
                        np.array_equal(anchors[p], w0[p]) for p in PATHS),
                    "weights": diff(got, traj[-1]), "pull_mattered": diff(traj[-1], no_pull[-1])["max_err_eps"],
                    "step_count": int(ops.convert_to_numpy(opt.step_count))}
    return out


def make_mixed_model(weights: dict[str, np.ndarray]) -> Any:
    """``make_model`` under the ``mixed_float16`` policy: float32 variables, float16 compute."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = [keras.Input((w,), dtype="float32", name=f"x{i}") for i, w in enumerate(IN)]
        outs = [keras.layers.Dense(OUT, name=n)(x) for n, x in zip(("backbone_0", "backbone_1", "head"), inputs)]
        model = keras.Model(inputs, keras.layers.Add()(outs))
    finally:
        keras.config.set_dtype_policy(previous)
    for v in model.trainable_variables:
        v.assign(weights[v.path].astype(np.float32))
    return model


TINY = 2.0**-28  # scales the mixed-precision loss so that unscaled float16 gradients underflow to 0


@keras.saving.register_keras_serializable(package="dualopt_tests")
def tiny_linear_loss(y_true: Any, y_pred: Any) -> Any:
    return ops.sum(y_true * y_pred, axis=-1) * TINY


@check
def loss_scaling() -> dict[str, Any]:
    """``loss_scale_factor``, and Keras's automatic LossScaleOptimizer, value-checked.

    float64: ``loss_scale_factor=1024`` (a power of two: scaling and unscaling
    are exact) gives bitwise the weights of the unscaled run.
    mixed_float16: the loss is scaled by 2**-28, so float16 gradients of the
    unscaled loss underflow to zero; with ``loss_scale_factor=2**16``
    (``auto_scale_loss=False``) or Keras's default dynamic LossScaleOptimizer
    around DualOpt, the gradients are exact again and the float32 weights match
    the core replaying the exact gradients (float32, traced float32 scalars:
    the ``traced-scalars`` budget of 16 float32 eps per step). Backbone
    finetune anchors stay the pre-fit weights (the wrapper builds DualOpt while
    tracing on TensorFlow).
    """
    out: dict[str, Any] = {}
    w0 = initial_weights(23)
    runs = {}
    for key, factor in (("unscaled", None), ("scaled", 1024.0)):
        opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune", rollback_max=4.0,
                      weight_decay=0.5, loss_scale_factor=factor)
        _, runs[key], grads = _fit_reference_case(opt, w0, 24, 2)
        runs[key + "_scale_loss"] = float(ops.convert_to_numpy(opt.scale_loss(ops.convert_to_tensor(1.0))))
    _, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
    out["float64"] = {"bitwise_equal_unscaled": all(np.array_equal(a, b) for a, b in zip(runs["scaled"],
                                                                                         runs["unscaled"])),
                      "scale_loss_of_1": runs["scaled_scale_loss"], "weights": diff(runs["scaled"], traj[-1])}

    xs, t = data(25)
    epochs = 2
    grads = [[(g * TINY).astype(np.float32) for g in step] for step in exact_grads(xs, t, epochs)]
    w32 = {k: v.astype(np.float32) for k, v in w0.items()}
    ref = ReferenceOptimizer([w32[p].copy() for p in PATHS], mixed_hps(weight_decay=0.5, rollback_max=4.0),
                             base_lr=LR, xp=np)
    for g in grads:
        ref.step(g, LR)
    eps32 = float(np.finfo(np.float32).eps)
    for key, opt_kw, compile_kw in (("mixed_loss_scale_factor", {"loss_scale_factor": 2.0**16},
                                     {"auto_scale_loss": False}),
                                    ("mixed_auto_loss_scale", {}, {}),
                                    ("mixed_unscaled", {}, {"auto_scale_loss": False})):
        keras.config.set_floatx("float32")
        try:
            model = make_mixed_model(w0)
            opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                          rollback_max=4.0, weight_decay=0.5, **opt_kw)
            model.compile(optimizer=opt, loss=tiny_linear_loss, **compile_kw)
            model.fit([x.astype(np.float32) for x in xs], t.astype(np.float32), batch_size=B, epochs=epochs,
                      shuffle=False, verbose=0)
        finally:
            keras.config.set_floatx("float64")
        got = weights_of(model)
        worst = max(float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30) for a, b in
                    zip(got, ref.params))
        anchors = {p: np.array(ops.convert_to_numpy(a)) for p, a in opt.anchors().items()}
        out[key] = {"optimizer": type(model.optimizer).__name__, "dtypes": sorted({str(w.dtype) for w in got}),
                    "max_err_eps32": worst / eps32, "steps": len(grads),
                    "step_count": int(ops.convert_to_numpy(opt.step_count)),
                    "anchors_equal_prefit": len(anchors) == 4 and all(np.array_equal(anchors[p], w32[p])
                                                                      for p in anchors)}
    return out


@check
def ema() -> dict[str, Any]:
    """``use_ema`` with ``ema_overwrite_frequency=3``: Keras copies the averages into the weights every 3 steps.

    The reference replays Keras's EMA rule (momentum 0 on the first apply, then
    ``ema_momentum``) and the overwrite; after ``fit`` the weights are the averages.
    """
    w0 = initial_weights(26)
    opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune", rollback_max=4.0,
                  weight_decay=0.5, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3)
    _, got, grads = _fit_reference_case(opt, w0, 27, 2)
    ref = ReferenceOptimizer([w0[p].copy() for p in PATHS], mixed_hps(weight_decay=0.5, rollback_max=4.0),
                             base_lr=LR, xp=np)
    average = None
    overwrites = 0
    for i, g in enumerate(grads):
        ref.step(g, LR)
        momentum = 0.8 if i else 0.0
        average = [p.copy() if average is None else momentum * a + (1 - momentum) * p
                   for a, p in zip(average or ref.params, ref.params)]
        if (i + 1) % 3 == 0:
            ref.params[:] = [a.copy() for a in average]
            overwrites += 1
    _, plain = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
    return {"weights": diff(got, average), "overwrites": overwrites,
            "ema_mattered": diff(average, plain[-1])["max_err_eps"]}


@check
def float64_model_float32_floatx() -> dict[str, Any]:
    """A float64 model in a float32 session (``dtype="float64"`` layers, default floatx).

    Keras's base class would hold the learning rate in a float32 variable
    (eta rounded by ~1e-8 relative); DualOpt holds it in float64. The same fit
    with a float32 learning-rate variable swapped in (what the base class
    creates) is recorded as the control: it must be far off.
    """

    def hold_in_float32(opt: Any, value: float) -> None:
        lr32 = keras.Variable(value, dtype="float32", name="learning_rate", trainable=False)
        opt._tracker.replace_tracked_value("variables", opt._learning_rate, lr32)
        opt._learning_rate = lr32

    w0 = initial_weights(28)
    xs, t = data(29)
    grads = exact_grads(xs, t, 2)
    _, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
    out: dict[str, Any] = {}
    keras.config.set_floatx("float32")
    try:
        for hold in ("float64", "float32"):
            opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                          rollback_max=4.0, weight_decay=0.5)
            if hold == "float32":
                hold_in_float32(opt, LR)
            inputs = [keras.Input((w,), dtype="float64", name=f"x{i}") for i, w in enumerate(IN)]
            outs = [keras.layers.Dense(OUT, dtype="float64", name=n)(x)
                    for n, x in zip(("backbone_0", "backbone_1", "head"), inputs)]
            model = keras.Model(inputs, keras.layers.Add(dtype="float64")(outs))
            for v in model.trainable_variables:
                v.assign(w0[v.path])
            model.compile(optimizer=opt, loss=linear_loss)
            model.fit(xs, t, batch_size=B, epochs=2, shuffle=False, verbose=0)
            out["model" if hold == "float64" else "control_float32_lr"] = {
                "lr_dtype": keras.backend.standardize_dtype(opt._learning_rate.dtype),
                "variable_dtypes": sorted({str(w.dtype) for w in weights_of(model)}),
                "weights": diff(weights_of(model), traj[-1])}
        # A float32 model steps with the same bits whichever dtype holds eta (one rounding either way).
        bits = []
        for hold in ("float64", "float32"):
            rng = np.random.default_rng(30)
            vs = [keras.Variable(rng.standard_normal(s).astype(np.float32), dtype="float32", name=f"w{i}")
                  for i, s in enumerate(((5, 3), (3,), (7,)))]
            small = dualopt(learning_rate=0.01, paradigm={"w2": "scratch"}, default_paradigm="finetune",
                            rollback_max=3.0, weight_decay=0.5)
            if hold == "float32":
                hold_in_float32(small, 0.01)
            held = keras.backend.standardize_dtype(small._learning_rate.dtype)
            for step in range(5):
                small.learning_rate = 0.013 * (step + 1)
                small.apply([rng.standard_normal(tuple(v.shape)).astype(np.float32) for v in vs], vs)
            bits.append((held, [np.array(ops.convert_to_numpy(v)) for v in vs + small.variables[2:]],
                         [v.path.removeprefix(f"{small.name}/") for v in small.variables]))
    finally:
        keras.config.set_floatx("float64")
    out.update({"float32_model_lr_dtypes": [b[0] for b in bits], "float32_model_slots": [b[2] for b in bits],
                "float32_model_same_bits": all(np.array_equal(a, b) for a, b in zip(bits[0][1], bits[1][1]))})
    return out


@check
def config_round_trip() -> dict[str, Any]:
    from dualopt.keras import DualOpt

    cases = {
        "mapping": dict(learning_rate=0.02, paradigm={"head": "scratch"}, default_paradigm="finetune",
                        layer_index=[0, 0, 1, 1, 2, 2], clipnorm=1.0, use_ema=True, ema_momentum=0.95,
                        ema_overwrite_frequency=5, loss_scale_factor=128.0, nonfinite="propagate"),
        "schedule": dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.9),
                         direction="sgd", nesterov=True, momentum=0.8, paradigm="finetune", rollback_min=0.5,
                         rollback_power=2.0, layer_index="layer", gradient_accumulation_steps=3),
        "callable": dict(learning_rate=0.001, paradigm=head_scratch, default_paradigm="none",
                         layer_index={"backbone_0": 0, "backbone_1": 1, "head": 2}, global_clipnorm=2.0),
    }
    out = {}
    for key, kwargs in cases.items():
        opt = DualOpt(**kwargs)
        config = opt.get_config()
        text = json.dumps(keras.optimizers.serialize(opt))
        again = keras.optimizers.deserialize(json.loads(text))
        config2 = again.get_config()
        direct = DualOpt.from_config(config).get_config()
        # Every plain argument comes back with the value it was given (a dropped option would compare equal above).
        lost = sorted(k for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, list, dict))
                      and config2.get(k) != v)
        out[key] = {"type": type(again).__name__, "equal": json.dumps(config2, sort_keys=True) ==
                    json.dumps(config, sort_keys=True) == json.dumps(direct, sort_keys=True),
                    "rollback_max": config["rollback_max"], "arguments_not_kept": lost}
    # The resolved rollback_max is stored: a later learning-rate change does not move it.
    opt = DualOpt(learning_rate=0.02, paradigm="finetune")
    opt.learning_rate = 0.1
    out["rollback_max_stored"] = DualOpt.from_config(opt.get_config()).rollback_max
    return out


@check
def errors() -> dict[str, Any]:
    from dualopt.keras import DualOpt

    out = {}
    bad = {"beta_1": dict(beta_1=1.0), "epsilon": dict(epsilon=-1.0), "paradigm": dict(paradigm="pretrained"),
           "paradigm_value": dict(paradigm={"head": "scrach"}), "default_paradigm": dict(default_paradigm="x"),
           "nonfinite": dict(nonfinite="raise"), "weight_decay_bound": dict(learning_rate=0.5, weight_decay=3.0),
           "layer_index": dict(layer_index="per-block"), "learning_rate": dict(learning_rate="fast")}
    for key, kwargs in bad.items():
        try:
            DualOpt(**kwargs)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    keras.config.set_floatx("float64")
    vs = [keras.Variable(np.ones((2, 2)), name="a"), keras.Variable(np.ones(2), name="b")]
    for key, kwargs in {"layer_index_length": dict(layer_index=[0]),
                        "anchor_shape": dict(paradigm="finetune", anchor={"a": np.ones(3)})}.items():
        try:
            DualOpt(**kwargs).build(vs)
            out[key] = None
        except ValueError as e:
            out[key] = str(e)
    model_variables = make_model(initial_weights()).trainable_variables
    out["paradigm_typo"] = _message(lambda: DualOpt(paradigm={"haed": "scratch"}, default_paradigm="finetune")
                                    .build(model_variables))
    out["layer_index_typo"] = _message(lambda: DualOpt(layer_index={"a": 0, "b": 1, "bb": 2}).build(vs))
    for key, value in (("schedule_negative", -0.01), ("schedule_nan", float("nan"))):
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5], [value, 0.01])
        out[key] = _message(lambda: DualOpt(learning_rate=schedule))
    out["callable_lr_negative"] = _message(lambda: DualOpt(learning_rate=lambda: -0.5))
    out["duplicate_build"] = _message(lambda: DualOpt().build([vs[0], vs[1], vs[0]]))
    twice = DualOpt(learning_rate=0.1)
    twice.build(vs)
    before = np.array(ops.convert_to_numpy(vs[0]))
    out["duplicate_apply"] = _message(lambda: twice.apply([np.ones((2, 2)), np.ones((2, 2))], [vs[0], vs[0]]))
    out["duplicate_apply_left_variable"] = bool(np.array_equal(ops.convert_to_numpy(vs[0]), before))
    try:
        DualOpt().exclude_from_weight_decay(var_names=["bias"])
        out["exclude_from_weight_decay"] = None
    except ValueError as e:
        out["exclude_from_weight_decay"] = str(e)
    # A state saved with other paradigms must not load silently into this layout.
    a = DualOpt(learning_rate=0.01, paradigm={"a": "finetune", "b": "scratch"})
    b = DualOpt(learning_rate=0.01, paradigm={"a": "scratch", "b": "finetune"})
    a.build(vs)
    b.build(vs)
    store = {str(i): np.array(ops.convert_to_numpy(v)) for i, v in enumerate(a.variables)}
    try:
        b.load_own_variables(store)
        out["load_other_layout"] = None
    except ValueError as e:
        out["load_other_layout"] = str(e)
    return out


def _message(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


@check
def sparse_gradients() -> dict[str, Any]:
    """tf.IndexedSlices (Embedding layers on TensorFlow), alone and after each of Keras's clippings.

    Three applies of IndexedSlices (with a repeated row) must give the same
    bits as the same gradients densified (the rule is dense), for adam and
    sgd. On every backend a model with an Embedding layer fits.
    """
    out: dict[str, Any] = {}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        rng = np.random.default_rng(40)
        table = rng.standard_normal((6, 3))
        grads = [tf.IndexedSlices(tf.constant(rng.standard_normal((3, 3))), tf.constant([4, 1, 4]),
                                  tf.constant([6, 3])) for _ in range(3)]
        for direction in ("adam", "sgd"):
            for clip in ({}, {"clipnorm": 0.5}, {"global_clipnorm": 0.5}, {"clipvalue": 0.2}):
                # Keras clips IndexedSlices by their rows (a repeated row counts twice in the norm), so
                # the dense run gets the gradients Keras's clipping gave, densified, and no clipping.
                clipped = [tf.convert_to_tensor(dualopt(**clip)._clip_gradients([g])[0]) for g in grads]
                got = []
                for dense in (False, True):
                    w = keras.Variable(table.copy(), name="table")
                    opt = dualopt(learning_rate=0.1, direction=direction, paradigm="finetune", rollback_max=2.0,
                                  **({} if dense else clip))
                    for g, c in zip(grads, clipped):
                        opt.apply([c if dense else g], [w])
                    got.append(np.array(ops.convert_to_numpy(w)))
                key = f"{direction}{''.join(f'.{k}' for k in clip)}"
                out[key] = {"bitwise": bool(np.array_equal(*got)), "moved": float(np.max(np.abs(got[0] - table)))}
    rng = np.random.default_rng(41)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="head")])
    opt = dualopt(learning_rate=0.01, paradigm={"head": "scratch"}, default_paradigm="finetune", clipnorm=1.0)
    model.compile(optimizer=opt, loss="mse")
    model.fit(rng.integers(0, 10, (16, 3)), rng.standard_normal((16, 1)), batch_size=8, epochs=2, verbose=0)
    out["embedding_fit"] = {"step_count": int(ops.convert_to_numpy(opt.step_count)),
                            "finite": bool(all(np.isfinite(w).all() for w in weights_of(model)))}
    return out


@check
def lazy_model_anchors() -> dict[str, Any]:
    """A model built lazily (no keras.Input) in every compile mode: anchors are its initial weights.

    On TensorFlow its variables are created while the train step is traced,
    with no value yet when the optimizer is built. One Dense layer with the
    exact-gradient loss: the weights must match the core replaying the same
    gradients from the same anchors.
    """
    w0 = initial_weights(42)
    init = {"kernel": w0["backbone_0/kernel"], "bias": w0["backbone_0/bias"]}
    xs, t = data(43)
    epochs = 2
    grads = [g[:2] for g in exact_grads(xs, t, epochs)]
    hp = HyperParams(paradigm="finetune", rollback_max=20.0)
    ref = ReferenceOptimizer([init["kernel"].copy(), init["bias"].copy()], [hp, hp], base_lr=LR, xp=np)
    for g in grads:
        ref.step(g, LR)
    variants = {"default": {}, "no_jit": {"jit_compile": False}, "eager": {"run_eagerly": True}}
    if BACKEND != "torch":
        variants["xla"] = {"jit_compile": True}
    out = {}
    for key, kw in variants.items():
        layer = keras.layers.Dense(OUT, name="lazy", kernel_initializer=keras.initializers.Constant(init["kernel"]),
                                   bias_initializer=keras.initializers.Constant(init["bias"]))
        model = keras.Sequential([layer])
        opt = dualopt(learning_rate=LR, paradigm="finetune", rollback_max=20.0)
        model.compile(optimizer=opt, loss=linear_loss, **kw)
        model.fit(xs[0], t, batch_size=B, epochs=epochs, shuffle=False, verbose=0)
        anchors = [np.array(ops.convert_to_numpy(a)) for a in opt.anchors().values()]
        out[key] = {"anchor_shapes": [list(a.shape) for a in anchors],
                    "anchors_equal_initial": len(anchors) == 2 and all(
                        np.array_equal(a, b) for a, b in zip(anchors, (init["kernel"], init["bias"]))),
                    "step_count": int(ops.convert_to_numpy(opt.step_count)),
                    "weights": diff(weights_of(model), ref.params)}
    return out


@check
def mirrored_strategy() -> dict[str, Any]:
    """tf.distribute.MirroredStrategy over two logical CPUs, default nonfinite="skip", a NaN on one replica.

    The batch of 8 is split 4 + 4; the NaN row is in the first replica's
    half of batch 1 of every epoch. The all-reduced gradients are exact (sums
    of small integers over powers of two), so the weights must match the core
    skipping those batches.
    """
    if BACKEND != "tensorflow":
        return {"not_applicable": "tf.distribute is TensorFlow's"}
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    w0 = initial_weights(44)
    xs, t = data(45, nan_batch=1)
    epochs = 2
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = make_model(w0)
        opt = dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                      rollback_max=4.0, weight_decay=0.5)
        model.compile(optimizer=opt, loss=linear_loss)
    model.fit(xs, t, batch_size=B, epochs=epochs, shuffle=False, verbose=0)
    grads = exact_grads(xs, t, epochs)
    ref, traj = reference(w0, mixed_hps(weight_decay=0.5, rollback_max=4.0), grads, [LR] * len(grads))
    return {"replicas": strategy.num_replicas_in_sync, "weights": diff(weights_of(model), traj[-1]),
            "skipped": int(ops.convert_to_numpy(opt.skipped)), "expected_skipped": ref.skipped,
            "step_count": int(ops.convert_to_numpy(opt.step_count)), "iterations": int(ops.convert_to_numpy(
                opt.iterations))}


@check
def tf_checkpoint() -> dict[str, Any]:
    """tf.train.Checkpoint save and restore of the optimizer (float learning rate, float32 session)."""
    if BACKEND != "tensorflow":
        return {"not_applicable": "tf.train.Checkpoint is TensorFlow's"}
    import tensorflow as tf

    out = {}
    keras.config.set_floatx("float32")
    try:
        for key, lr in (("float", 0.01), ("schedule", keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9))):
            rng = np.random.default_rng(46)
            w = keras.Variable(rng.standard_normal(3).astype("float32"), name="w")
            opt = dualopt(learning_rate=lr, paradigm="finetune")
            for _ in range(3):
                opt.apply([rng.standard_normal(3).astype("float32")], [w])
            with tempfile.TemporaryDirectory() as tmp:
                path = tf.train.Checkpoint(optimizer=opt).save(os.path.join(tmp, "ckpt"))
                again = dualopt(learning_rate=lr, paradigm="finetune")
                again.build([w])
                tf.train.Checkpoint(optimizer=again).restore(path).assert_consumed()
            out[key] = {"n_variables": len(opt.variables), "restored_equal": len(opt.variables) == len(
                again.variables) and all(np.array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
                                        for a, b in zip(opt.variables, again.variables)),
                        "step_count": int(ops.convert_to_numpy(again.step_count))}
    finally:
        keras.config.set_floatx("float64")
    return out


@check
def optimizer_names() -> dict[str, Any]:
    """Default names are Keras's automatic unique names, as for Keras's own optimizers."""
    from dualopt.keras import DualOpt

    a, b = DualOpt(), DualOpt()
    named = DualOpt(name="backbone_opt")
    adam = keras.optimizers.Adam()
    return {"default_names": [a.name, b.name], "given": named.name,
            "from_config": DualOpt.from_config(a.get_config()).name, "keras_adam": adam.name}


@check
def load_weights_resume() -> dict[str, Any]:
    """compile -> load_weights -> fit (Keras's standard resume) == the uninterrupted run, bit for bit.

    The weights file was saved after 2 of 4 epochs; the new optimizer is not
    built when the file is loaded. Also: a file holding Keras Adam's state is
    refused when the optimizer is built, with a message saying what to do.
    """
    w0 = initial_weights(47)
    xs, t = data(48)

    def make_opt() -> Any:
        return dualopt(learning_rate=LR, paradigm={"head": "scratch"}, default_paradigm="finetune",
                       rollback_max=4.0, weight_decay=0.5)

    straight = make_model(w0)
    fit(straight, make_opt(), xs, t, 4)
    first = make_model(w0)
    fit(first, make_opt(), xs, t, 2)
    adam_model = make_model(w0)
    adam_model.compile(optimizer=keras.optimizers.Adam(LR), loss=linear_loss)
    adam_model.fit(xs, t, batch_size=B, epochs=1, shuffle=False, verbose=0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.weights.h5")
        first.save_weights(path)
        resumed = make_model(initial_weights(49))  # other weights: load_weights must replace them
        resumed.compile(optimizer=make_opt(), loss=linear_loss)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.load_weights(path)
        out["warnings"] = [str(w.message) for w in caught]
        out["built_after_load"] = bool(resumed.optimizer.built)
        resumed.fit(xs, t, batch_size=B, epochs=2, shuffle=False, verbose=0)
        adam_path = os.path.join(tmp, "adam.weights.h5")
        adam_model.save_weights(adam_path)
        other = make_model(w0)
        other.compile(optimizer=make_opt(), loss=linear_loss)
        other.load_weights(adam_path)
        out["adam_state"] = _message(lambda: other.fit(xs, t, batch_size=B, epochs=1, shuffle=False, verbose=0))
    opt_a, opt_b = straight.optimizer, resumed.optimizer
    out["weights"] = diff(weights_of(resumed), weights_of(straight))
    out["optimizer_state_equal"] = len(opt_a.variables) == len(opt_b.variables) and all(
        np.array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b)) for a, b in zip(opt_a.variables,
                                                                                         opt_b.variables))
    out["step_count"] = int(ops.convert_to_numpy(opt_b.step_count))
    return out


@check
def doctests() -> dict[str, Any]:
    """Every module of the dualopt.keras package (the examples live in its private modules)."""
    import dualopt.keras

    keras.config.set_floatx("float32")
    attempted = failed = 0
    for info in pkgutil.iter_modules(dualopt.keras.__path__):
        if info.name == "_torch" and BACKEND != "torch":
            continue
        result = doctest.testmod(importlib.import_module(f"dualopt.keras.{info.name}"), verbose=False)
        attempted, failed = attempted + result.attempted, failed + result.failed
    keras.config.set_floatx("float64")
    return {"attempted": attempted, "failed": failed}


@check
def imports() -> dict[str, Any]:
    """Frameworks that importing dualopt.keras loaded beyond those importing keras had loaded."""
    return {"loaded_by_keras": sorted(_LOADED_BY_KERAS), "added_by_dualopt": sorted(_LOADED_BY_DUALOPT)}


def run_all() -> dict[str, Any]:
    """Every check (or those named in ``DUALOPT_KERAS_CHECKS``, comma-separated), in float64 floatx."""
    keras.config.set_floatx("float64")
    t0 = time.perf_counter()
    only = set(os.environ.get("DUALOPT_KERAS_CHECKS", "").split(",")) - {""}
    for name, run in CHECKS.items():
        if not only or name in only:
            run()
    RESULTS["total_seconds"] = round(time.perf_counter() - t0, 2)
    return RESULTS
