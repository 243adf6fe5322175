"""The non-finite check of ``dualopt.keras`` inside a jitted jax step (issue 21).

XLA:CPU compiled the core's ``all(isfinite(g))`` into a pass writing a boolean
array of every gradient's shape plus a window reduction over it, most of
Keras-on-jax's ``nonfinite="skip"`` overhead; the adapter now uses the optax
adapter's exact ``sum(g)`` check there. These tests run in one ``KERAS_BACKEND=jax``
subprocess and check the compiled program's structure and the check's exactness
(NaN, Inf, and finite gradients whose float32 sum overflows).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.keras_backend, pytest.mark.xdist_group("keras-jax")]

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, keras, numpy as np
    from dualopt.keras import DualOpt

    keras.config.set_floatx("float32")

    def model():
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, name="a"),
                                 keras.layers.Dense(64, name="b")])

    def jitted(opt):
        def step(ov, g, tv):
            new_tv, new_ov = opt.stateless_apply(ov, g, tv)
            return new_ov, new_tv
        return jax.jit(step)

    def run(grads_np, nonfinite):
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

    shapes = [(64, 64), (64,), (64, 64), (64,)]
    rng = np.random.default_rng(0)
    finite = [(1e-3 * rng.standard_normal(s)).astype("float32") for s in shapes]
    huge = [g.copy() for g in finite]
    huge[2][:] = np.float32(3e38)  # every element finite; their float32 sum overflows to +inf
    out = {}
    for name, grads in (("finite", finite), ("huge", huge)):
        for nonfinite in ("skip", "propagate"):
            w, skipped, t, hlo = run(grads, nonfinite)
            out[f"{name}_{nonfinite}"] = {"weights": w, "skipped": skipped, "t": t}
            if name == "finite":
                out[f"{name}_{nonfinite}"]["bool_arrays"] = sum(hlo.count(f"pred[{d}]") for d in ("64,64", "64"))
    for bad in (np.nan, np.inf, -np.inf):
        grads = [g.copy() for g in finite]
        grads[3][7] = bad
        w, skipped, t, _ = run(grads, "skip")
        out[f"bad_{bad}"] = {"weights": w, "skipped": skipped, "t": t}
    print(json.dumps(out))
''')


@functools.lru_cache(maxsize=None)
def results() -> dict:
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jitted_check_writes_no_boolean_array_of_a_gradient():
    r = results()
    # The old check wrote pred[64,64] / pred[64] arrays (one per gradient) before reducing them.
    assert r["finite_skip"]["bool_arrays"] == 0
    assert r["finite_propagate"]["bool_arrays"] == 0


def test_jitted_check_is_exact():
    r = results()
    # Finite gradients: skip applies the same update as propagate, bit for bit.
    assert r["finite_skip"]["weights"] == r["finite_propagate"]["weights"]
    assert (r["finite_skip"]["skipped"], r["finite_skip"]["t"]) == (0, 1)
    # A finite gradient whose float32 sum overflows is still finite: applied, not skipped.
    assert r["huge_skip"]["weights"] == r["huge_propagate"]["weights"]
    assert (r["huge_skip"]["skipped"], r["huge_skip"]["t"]) == (0, 1)
    assert r["huge_skip"]["weights"] != r["finite_skip"]["weights"]
    # One NaN or Inf element anywhere: the whole step is skipped and the weights keep their value.
    for bad in ("nan", "inf", "-inf"):
        case = r[f"bad_{bad}"]
        assert (case["skipped"], case["t"]) == (1, 0), bad
        assert all(x == 0.5 for w in case["weights"] for x in (w if isinstance(w[0], float) else sum(w, []))), bad
