"""Every Keras check that needs a backend, batched into one process per backend.

Run as ``KERAS_BACKEND=<backend> JAX_ENABLE_X64=1 python tests/keras/_backend_checks.py out.json``;
``test_keras_backends.py`` does so for each backend and asserts on the JSON
(importing Keras with a backend costs 5-7 s, so the checks share one process).
Each check records measured values (max differences, counters, flags); the
pytest side decides pass or fail, so a broken check shows its numbers.

Exact gradients: the fit checks use a model whose loss is linear in its
outputs, ``mean_i sum_j t_ij * y_ij`` with ``y = D0(x0) + D1(x1) + head(x2)``.
The gradients (``x_k^T t / B`` and ``sum(t) / B``) do not depend on the
weights, and with small-integer data and a power-of-two batch they are exact in
float64 whatever the summation order, so
:class:`decoupled_core.ReferenceOptimizer` can replay exactly the gradients
Keras's compiled train step used.
"""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np

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
    """torch only: the _foreach_ fast path against the per-variable generic path, bit for bit."""
    if BACKEND != "torch":
        return {"skipped": "torch backend only"}
    import torch

    out = {}
    for case in load_cases():
        if not _supported(case):
            continue
        fast, generic = replay_case(case, fast_path=True), replay_case(case, fast_path=False)
        out[f"vector:{case.name}.{case.dtype}"] = all(np.array_equal(f[n], g[n], equal_nan=True)
                                                      for f, g in zip(fast, generic) for n in case.names)
    rng = np.random.default_rng(5)
    shapes = [(7, 5), (5,), (3, 4, 2), (), (0, 3), (16,), (9, 9), (1,)]
    for dtype in ("float32", "float64", "mixed16"):
        for direction, nesterov in (("adam", False), ("sgd", True), ("sgd", False)):
            for paradigm in ("scratch", "finetune", "none", "mixed"):
                results = []
                for fast_path in (True, False):
                    keras.config.set_floatx("float32" if dtype != "float64" else "float64")
                    dts = [("float16" if (dtype == "mixed16" and i % 3 == 0) else
                            ("float32" if dtype == "mixed16" else dtype)) for i in range(len(shapes))]
                    local = np.random.default_rng(11)
                    vs = [keras.Variable(local.standard_normal(s).astype(dt), dtype=dt, name=f"v{i}")
                          for i, (s, dt) in enumerate(zip(shapes, dts))]
                    para = paradigm if paradigm != "mixed" else {"v1": "scratch", "v5": "none", "v6": "scratch"}
                    opt = dualopt(learning_rate=0.05, direction=direction, nesterov=nesterov, paradigm=para,
                                  default_paradigm="finetune", weight_decay=0.7, rollback_max=3.0,
                                  rollback_min=0.5, layer_index=[0, 0, 1, 2, 2, 3, 4, 4])
                    opt._use_fast_path = fast_path
                    for step in range(6):
                        grads = [local.standard_normal(s) for s in shapes]
                        if step == 3:
                            grads[2][(0, 1, 1)] = np.inf
                        opt.learning_rate = 0.05 * (1 + step % 2)
                        opt.apply([torch.as_tensor(g).to(getattr(torch, dt)) for g, dt in zip(grads, dts)], vs)
                    results.append([np.array(ops.convert_to_numpy(v)) for v in vs]
                                   + [np.array(ops.convert_to_numpy(v)) for v in opt.variables])
                out[f"random:{dtype}:{direction}{'+nesterov' if nesterov else ''}:{paradigm}"] = all(
                    np.array_equal(a, b, equal_nan=True) for a, b in zip(*results))
    keras.config.set_floatx("float64")
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
            "slot_names": [v.path for v in opt_b.variables]}


@check
def learning_rate_schedules() -> dict[str, Any]:
    """A LearningRateSchedule: the reference uses lr_t = schedule(t - 1) evaluated eagerly."""
    out = {}
    xs, t = data(6)
    epochs = 3
    grads = exact_grads(xs, t, epochs)
    for name, sched in (("piecewise", keras.optimizers.schedules.PiecewiseConstantDecay([3, 7], [0.02, 0.01, 0.004])),):
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


@check
def config_round_trip() -> dict[str, Any]:
    from dualopt.keras import DualOpt

    cases = {
        "mapping": dict(learning_rate=0.02, paradigm={"head": "scratch"}, default_paradigm="finetune",
                        layer_index=[0, 0, 1, 1, 2, 2], clipnorm=1.0, use_ema=True, nonfinite="propagate"),
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
        out[key] = {"type": type(again).__name__, "equal": json.dumps(config2, sort_keys=True) ==
                    json.dumps(config, sort_keys=True) == json.dumps(direct, sort_keys=True),
                    "rollback_max": config["rollback_max"]}
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


@check
def doctests() -> dict[str, Any]:
    import dualopt.keras

    keras.config.set_floatx("float32")
    result = doctest.testmod(dualopt.keras, verbose=False)
    keras.config.set_floatx("float64")
    return {"attempted": result.attempted, "failed": result.failed}


@check
def imports() -> dict[str, Any]:
    """Frameworks that importing dualopt.keras loaded beyond those importing keras had loaded."""
    return {"loaded_by_keras": sorted(_LOADED_BY_KERAS), "added_by_dualopt": sorted(_LOADED_BY_DUALOPT)}


def main(out_path: str) -> None:
    keras.config.set_floatx("float64")
    t0 = time.perf_counter()
    only = set(os.environ.get("DUALOPT_KERAS_CHECKS", "").split(",")) - {""}
    for name, run in CHECKS.items():
        if not only or name in only:
            run()
    RESULTS["total_seconds"] = round(time.perf_counter() - t0, 2)
    with open(out_path, "w") as fh:
        json.dump(RESULTS, fh, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
