"""Keras side of the reliability suite, run in a subprocess with ``KERAS_BACKEND`` set.

:func:`checks` (launched once per backend by ``_launcher.keras_result``) runs
every check below and returns measured values (messages, bit-equality flags,
counters); the pytest side (``test_keras_nonfinite.py``,
``tests/conformance/test_adapters_validation.py``) decides pass or fail. A
check that raises records ``{"__error__": traceback}``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

import decoupled_core as dc
from tests.common.cases import CASES, PARAM_SHAPES, BadInput, adapter_kwargs, saved_setup
from tests.keras._launcher import run_named

BACKEND = keras.backend.backend()
CHECKS: dict[str, Callable[[], Any]] = {}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    CHECKS[fn.__name__] = fn
    return fn


def to_numpy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x), copy=True)


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def all_same(xs: list, ys: list) -> bool:
    return len(xs) == len(ys) and all(same_bits(x, y) for x, y in zip(xs, ys))


# --------------------------------------------------------------------------------------------- validation
@check
def validation() -> dict[str, str | None]:
    """Every bad-input case: the message of DualOpt(...) + build(), or None when accepted."""
    from dualopt.keras import DualOpt

    out: dict[str, str | None] = {}
    for case in CASES:
        if case.kind == "state":
            continue  # state_loads
        kw = adapter_kwargs(case, "keras")
        variables = [keras.Variable(np.zeros(s, np.float32), name=n) for s, n in zip(PARAM_SHAPES, "ab")]
        try:
            DualOpt(**kw).build(variables)
            out[case.id] = None
        except Exception as e:  # recorded and asserted on by pytest
            out[case.id] = f"{type(e).__name__}: {e}"
    return out


@check
def state_loads() -> dict[str, dict[str, Any]]:
    """Every state case: ``load_own_variables`` of a built, stepped DualOpt; the message and whether it is untouched."""
    from dualopt.keras import DualOpt

    def stepped(shapes: tuple, opt: Any) -> Any:
        variables = [keras.Variable(np.arange(float(np.prod(s)), dtype=np.float32).reshape(s), name=n)
                     for s, n in zip(shapes, "ab")]
        # builds; moments become non-zero (backend tensors: Keras's torch Adam takes no numpy arrays)
        opt.apply([ops.convert_to_tensor(np.ones(s, np.float32)) for s in shapes], variables)
        return opt

    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        if case.kind != "state":
            continue
        setup = saved_setup(case)
        if setup is None:
            source = stepped(PARAM_SHAPES, keras.optimizers.Adam(1e-3))
        else:
            source = stepped(setup[0], DualOpt(**adapter_kwargs(BadInput("saved", changes=setup[1]), "keras")))
        store: dict[str, Any] = {}
        source.save_own_variables(store)
        target = stepped(PARAM_SHAPES, DualOpt(learning_rate=1e-3))
        before = [to_numpy(v) for v in target.variables]
        try:
            target.load_own_variables(store)
            msg = None
        except Exception as e:  # recorded and asserted on by pytest
            msg = f"{type(e).__name__}: {e}"
        out[case.id] = {"message": msg, "untouched": all_same(before, [to_numpy(v) for v in target.variables])}
    return out


# ------------------------------------------------------------------------------------ non-finite
NF_BATCH = 8
NF_CLEAN_BATCHES = 4
NF_EPOCHS = 2
#: Two set-ups, both with use_ema. "adam-ema": finetune backbone + scratch head, bad copies after clean batches.
#: "sgd-first-bad": Nesterov SGD, the very first batch of the run is bad (Keras starts the EMA average, zeros
#: at build, with momentum 0 on iterations == 0; DualOpt moves that to the first applied batch).
NF_SETUPS: dict[str, dict[str, Any]] = {
    "adam-ema": {"kw": dict(learning_rate=0.01, paradigm={"head": "scratch"}, default_paradigm="finetune",
                            rollback_max=4.0, weight_decay=0.5, use_ema=True, ema_momentum=0.9),
                 "bad_after": {0: "nan", 2: "inf", 3: "-inf"}},
    "sgd-first-bad": {"kw": dict(learning_rate=0.05, direction="sgd", momentum=0.9, nesterov=True,
                                 paradigm={"head": "none"}, default_paradigm="finetune", rollback_max=2.0,
                                 use_ema=True, ema_momentum=0.9),
                      "bad_before": {0: "nan", 2: "-inf"}},
}
_BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def _nf_data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((NF_BATCH, 4)).astype(np.float32) for _ in range(NF_CLEAN_BATCHES)]
    ys = [rng.standard_normal((NF_BATCH, 2)).astype(np.float32) for _ in range(NF_CLEAN_BATCHES)]
    return xs, ys


def _nf_model(kw: dict[str, Any]) -> tuple[Any, Any]:
    from dualopt.keras import DualOpt

    rng = np.random.default_rng(12)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="backbone"),
                              keras.layers.Dense(2, name="head")])
    for v in model.trainable_variables:
        v.assign(rng.standard_normal(tuple(v.shape)).astype(np.float32))
    opt = DualOpt(**kw)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)  # anchors = these weights; lets us snapshot before the first batch
    return model, opt


class _Snapshots(keras.callbacks.Callback):
    """Every model and optimizer variable after every batch (``self.model`` syncs jax's state first)."""

    def __init__(self) -> None:
        super().__init__()
        self.after: list[dict[str, list[np.ndarray]]] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.after.append(_nf_snapshot(self.model))


def _nf_snapshot(model: Any) -> dict[str, list[np.ndarray]]:
    opt = model.optimizer
    counters = {id(opt.iterations): "iterations", id(opt._skipped): "skipped"}
    state = [to_numpy(v) for v in opt.variables if id(v) not in counters]
    return {"weights": [to_numpy(v) for v in model.trainable_variables], "state": state,
            "iterations": [to_numpy(opt.iterations)], "skipped": [to_numpy(opt._skipped)]}


def _nf_same(a: dict, b: dict) -> bool:
    return all_same(a["weights"], b["weights"]) and all_same(a["state"], b["state"])


@check
def nonfinite_fit() -> dict[str, Any]:
    """Bad batches inside ``model.fit``'s train step (float32): every skipped one changes nothing, and the run
    equals the run without them, batch for batch and bit for bit (weights, m/v or momentum, anchors, t, EMA)."""
    xs, ys = _nf_data()
    out: dict[str, Any] = {}
    for name, setup in NF_SETUPS.items():
        # the batch sequence of one epoch: clean batch k, with bad copies of it before/after as the setup says
        seq: list[tuple[int, str | None]] = []
        for k in range(NF_CLEAN_BATCHES):
            if k in setup.get("bad_before", {}):
                seq.append((k, setup["bad_before"][k]))
            seq.append((k, None))
            if k in setup.get("bad_after", {}):
                seq.append((k, setup["bad_after"][k]))
        bx, by = [], []
        for k, bad in seq:
            x = xs[k].copy()
            if bad is not None:
                x[1, 2] = _BAD[bad]  # one element of one input: the batch's gradient is non-finite
            bx.append(x)
            by.append(ys[k])
        runs = {}
        for run, (x, y) in {"clean": (np.concatenate(xs), np.concatenate(ys)),
                            "with_bad": (np.concatenate(bx), np.concatenate(by))}.items():
            model, opt = _nf_model(setup["kw"])
            before = _nf_snapshot(model)
            snaps = _Snapshots()
            model.fit(x, y, batch_size=NF_BATCH, epochs=NF_EPOCHS, shuffle=False, verbose=0, callbacks=[snaps])
            runs[run] = (before, snaps.after, [to_numpy(v) for v in model.trainable_variables], opt)
        c_before, c_after, c_final, c_opt = runs["clean"]
        b_before, b_after, b_final, b_opt = runs["with_bad"]
        full_seq = seq * NF_EPOCHS
        injections, trajectory, moved = [], [], []
        previous, clean_i = b_before, 0
        for i, (k, bad) in enumerate(full_seq):
            now = b_after[i]
            if bad is not None:
                injections.append({"value": bad, "batch": i, "unchanged": _nf_same(previous, now),
                                   "skipped_delta": int(now["skipped"][0] - previous["skipped"][0]),
                                   "iterations_delta": int(now["iterations"][0] - previous["iterations"][0])})
            else:
                trajectory.append(_nf_same(now, c_after[clean_i]))
                moved.append(not _nf_same(previous, now))  # so "unchanged" above is not vacuous
                clean_i += 1
            previous = now
        out[name] = {
            "batches": len(b_after), "expected_batches": len(full_seq),
            "clean_before_equal": _nf_same(c_before, b_before),
            "injections": injections,
            "trajectory_bitwise": trajectory,
            "clean_batches_change_state": moved,
            "final_weights_bitwise": all_same(c_final, b_final),  # after fit (EMA overwrite where use_ema)
            "skipped": int(to_numpy(b_opt.skipped)), "clean_skipped": int(to_numpy(c_opt.skipped)),
            "step_count": int(to_numpy(b_opt.step_count)), "clean_step_count": int(to_numpy(c_opt.step_count)),
            "iterations": int(to_numpy(b_opt.iterations)),
        }
    # nonfinite="propagate": no check, the NaN reaches the weights and nothing is counted
    model, opt = _nf_model(dict(learning_rate=0.01, nonfinite="propagate"))
    x = xs[0].copy()
    x[1, 2] = np.nan
    model.fit(x, ys[0], batch_size=NF_BATCH, epochs=1, shuffle=False, verbose=0)
    out["propagate"] = {"weights_have_nan": bool(any(np.isnan(w).any() for w in
                                                     [to_numpy(v) for v in model.trainable_variables])),
                        "skipped": int(to_numpy(opt.skipped)), "step_count": int(to_numpy(opt.step_count))}
    return out


def checks(tmp: str) -> dict[str, Any]:
    """Every check's measured values; ``tmp`` is a scratch directory."""
    os.environ["DUALOPT_REL_TMP"] = tmp
    return run_named(BACKEND, CHECKS.items())
