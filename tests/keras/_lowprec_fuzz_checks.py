"""Keras low-precision training and fuzzed single steps, run with ``KERAS_BACKEND`` set (one backend per process).

:func:`checks` (launched by ``_lowprec_fuzz.py``) runs both and returns
measured values; the pytest side (``test_keras_lowprec.py``,
``tests/conformance/test_adapters_fuzz.py``) decides pass or fail. ``JAX_ENABLE_X64=1`` is set
by the caller so that float64 variables exist on jax.

- ``lowprec``: the problem of ``tests/common/lowprec_data.py`` as a Keras model whose
  layers use the ``bfloat16`` / ``float16`` dtype policy (variables, activations
  and gradients in that dtype; the loss in float32), trained with ``fit`` by
  DualOpt (scratch; finetune backbone + scratch head) and by Keras's AdamW in
  the same dtype, and in float32. Final losses, finiteness, slot dtypes.
- ``fuzz``: hypothesis examples of ``tests.common.fuzz_spec.problems`` (one set of
  hyperparameters, per-variable paradigms and layer keys, explicit anchors),
  applied with ``optimizer.apply`` step by step and checked against the spec
  with ``tests.common.fuzz_spec.check_against_spec`` (TOLERANCES.md's ``traced-scalars``
  class: the scalars are computed on the device in the variables' compute
  dtype, 16 eps per step of the running scale).
"""

from __future__ import annotations

import math
import traceback
from typing import Any

import keras
import numpy as np
from keras import ops

from dualopt.keras import DualOpt
from tests.common import fuzz_spec as fz
from tests.common import lowprec_data as lp
from tests.keras._launcher import run_named

BACKEND = keras.backend.backend()
FUZZ_EXAMPLES = 20  # eager Keras ops compile per shape on jax: few examples, few shapes


# ------------------------------------------------------------------------------------------------ lowprec
def model(dtype: str) -> Any:
    names = [f"backbone_{i}" for i in range(len(lp.SIZES) - 2)] + ["head"]
    inp = keras.Input((lp.SIZES[0],), dtype="float32")
    h = inp
    for name, width in zip(names, lp.SIZES[1:]):
        h = keras.layers.Dense(width, activation=None if name == "head" else "tanh", name=name, dtype=dtype)(h)
    m = keras.Model(inp, h)
    for layer, (kernel, bias) in zip([m.get_layer(n) for n in names], lp.initial_weights()):
        layer.kernel.assign(kernel.astype(dtype))
        layer.bias.assign(bias.astype(dtype))
    return m


def optimizer(kind: str) -> Any:
    if kind == "adamw":
        return keras.optimizers.AdamW(lp.LR, weight_decay=lp.WEIGHT_DECAY)
    if kind == "scratch":
        return DualOpt(lp.LR, weight_decay=lp.WEIGHT_DECAY)
    return DualOpt(lp.LR, weight_decay=lp.WEIGHT_DECAY, paradigm={"head": "scratch"}, default_paradigm="finetune")


def train(kind: str, dtype: str) -> dict[str, Any]:
    m = model(dtype)
    opt = optimizer(kind)
    # The loss in float32 (its own dtype), whatever the layers compute in.
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float32"))
    x, y = lp.data()
    first = float(ops.convert_to_numpy(m.compute_loss(x=x[:lp.BATCH], y=y[:lp.BATCH],
                                                      y_pred=m(x[:lp.BATCH]))))
    # One epoch over the data repeated: the same 300 batches as lp.batch(k), without 75 epochs' overhead.
    reps = lp.STEPS * lp.BATCH // len(x)
    hist = m.fit(np.tile(x, (reps, 1)), np.tile(y, reps), batch_size=lp.BATCH, epochs=1, shuffle=False, verbose=0)
    logits = ops.convert_to_numpy(ops.cast(m(x), "float32")).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    final = float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]))
    weights = [np.asarray(ops.convert_to_numpy(ops.cast(v, "float32"))) for v in m.trainable_variables]
    # Moments and anchors (the learning-rate variable is Keras's, float64 under jax x64).
    float_slots = [v for v in opt.variables if "float" in keras.backend.standardize_dtype(v.dtype)
                   and not v.path.endswith("learning_rate")]
    return {
        "first": first, "final": final, "losses_finite": all(math.isfinite(v) for v in hist.history["loss"]) and math.isfinite(final),
        "weights_finite": all(bool(np.all(np.isfinite(w))) for w in weights),
        "param_dtypes": sorted({keras.backend.standardize_dtype(v.dtype) for v in m.trainable_variables}),
        "slot_dtypes": sorted({keras.backend.standardize_dtype(v.dtype) for v in float_slots}),
        "n_anchors": len(opt.anchors()) if isinstance(opt, DualOpt) else 0,
    }


def lowprec() -> dict[str, Any]:
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        for kind in ("scratch", "finetune", "adamw"):
            if (kind, dtype) != ("adamw", "float32"):  # AdamW is only compared in the low dtypes
                out[f"{kind}/{dtype}"] = train(kind, dtype)
    return out


# ------------------------------------------------------------------------------------------------ fuzz
def fuzz() -> dict[str, Any]:
    from hypothesis import given

    ran: list[str] = []
    worst: dict[str, float] = {}

    def body(p: fz.Problem) -> None:
        p = fz.flushed(p, ftz=BACKEND != "torch")  # XLA and TensorFlow flush subnormals on CPU
        p.lrs = [p.base_lr] * len(p.lrs)  # one float learning rate
        g = p.groups[0]
        names = [f"v{i}" for i in range(len(p.shapes))]
        wide = "float64" if p.dtype == "float64" else "float32"  # exact carriers of the values (torch has no
        # numpy bfloat16): widen, let Keras round back to the variable's dtype (exact), and widen to read
        variables = [keras.Variable(t.astype(wide), dtype=p.dtype, name=n) for t, n in zip(p.theta, names)]
        opt = DualOpt(p.base_lr, direction=g.direction, beta_1=g.beta1, beta_2=g.beta2, epsilon=g.eps,
                      momentum=g.momentum, nesterov=g.nesterov, weight_decay=g.weight_decay,
                      rollback_max=g.rollback_max, rollback_min=g.rollback_min, rollback_power=g.rollback_power,
                      paradigm={n: q.paradigm for n, q in zip(names, p.groups)}, layer_index=p.layer_index,
                      anchor=[a.astype(wide) for a in p.anchor])
        out_p, out_s = [], []
        for row in p.grads:
            opt.apply([ops.cast(ops.convert_to_tensor(x.astype(wide)), p.dtype) for x in row], variables)
            out_p.append([np.asarray(ops.convert_to_numpy(ops.cast(v, wide))).astype(fz.np_dtype(p.dtype))
                          for v in variables])
            # The slots of each variable (the adapter's per-variable record; slot order is its format).
            out_s.append([[np.asarray(ops.convert_to_numpy(s)) for s in f.slots] for f in opt._facts])
        used = fz.check_against_spec(p, out_p, out_s, f"dualopt.keras[{BACKEND}]", exact=False, tol_ulps=16.0)
        for key, value in used.items():
            worst[key] = max(worst.get(key, 0.0), value)
        ran.append(p.dtype)

    failure = None
    try:
        # One run per dtype, so that each gets its share of the examples.
        for dtype in ("float64", "float32", "bfloat16", "float16"):
            strategy = fz.problems(shapes=fz.FEW_SHAPES, allow_missing=False, one_group=True, max_tensors=3,
                                   dtypes=(dtype,))
            fz.profile(FUZZ_EXAMPLES // 4)(given(p=strategy)(body))()
    except Exception:  # the falsifying example and the assertion, for the pytest side to show
        failure = traceback.format_exc()[-6000:]
    return {"examples": len(ran), "dtypes": {d: ran.count(d) for d in sorted(set(ran))}, "failure": failure,
            "bound_used": worst}


def checks() -> dict[str, Any]:
    """Both checks' measured values (``{"__error__": traceback}`` for a check that raised)."""
    return run_named(BACKEND, (("lowprec", lowprec), ("fuzz", fuzz)))
