"""The jitted finiteness check of ``dualopt.keras`` on jax, launched by ``test_keras_jax_check.py`` (``_launcher``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np

from dualopt.keras import DualOpt


def model():
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, name="a"),
                             keras.layers.Dense(64, name="b")])


def jitted(opt):
    def step(ov, g, tv):
        new_tv, new_ov = opt.stateless_apply(ov, g, tv)
        return new_ov, new_tv
    return jax.jit(step)


def step_once(grads_np, nonfinite):
    m = model()
    m.set_weights([np.full(w.shape, 0.5, "float32") for w in m.get_weights()])
    opt = DualOpt(1e-3, nonfinite=nonfinite)
    tv = m.trainable_variables
    opt.build(tv)
    ov = [v.value for v in opt.variables]
    grads = [jnp.asarray(g) for g in grads_np]
    fn = jitted(opt)
    new_ov, new_tv = fn(ov, grads, [v.value for v in tv])
    for v, x in zip(opt.variables, new_ov):
        v.assign(x)
    hlo = fn.lower(ov, grads, [v.value for v in tv]).compile().as_text()
    return ([np.asarray(x).tolist() for x in new_tv], int(np.asarray(opt.skipped)), int(np.asarray(opt.step_count)),
            hlo)


def run() -> dict:
    """Weights, counters and the compiled program's boolean arrays of every case."""
    keras.config.set_floatx("float32")
    shapes = [(64, 64), (64,), (64, 64), (64,)]
    rng = np.random.default_rng(0)
    finite = [(1e-3 * rng.standard_normal(s)).astype("float32") for s in shapes]
    huge = [g.copy() for g in finite]
    huge[2][:] = np.float32(3e38)  # every element finite; their float32 sum overflows to +inf
    out = {}
    for name, grads in (("finite", finite), ("huge", huge)):
        for nonfinite in ("skip", "propagate"):
            w, skipped, t, hlo = step_once(grads, nonfinite)
            out[f"{name}_{nonfinite}"] = {"weights": w, "skipped": skipped, "t": t}
            if name == "finite":
                out[f"{name}_{nonfinite}"]["bool_arrays"] = sum(hlo.count(f"pred[{d}]") for d in ("64,64", "64"))
    for bad in (np.nan, np.inf, -np.inf):
        grads = [g.copy() for g in finite]
        grads[3][7] = bad
        w, skipped, t, _ = step_once(grads, "skip")
        out[f"bad_{bad}"] = {"weights": w, "skipped": skipped, "t": t}
    return out
