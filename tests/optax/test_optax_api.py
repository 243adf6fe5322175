"""dualopt.optax's arguments: per-leaf settings, layer numbering, validation messages, lazy imports,
and the traced bias corrections against the core's host values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from decoupled_core import HyperparameterError, adam_coefficients


def _dense(*names, dtype=np.float64):
    import jax.numpy as jnp

    return {n: {"kernel": jnp.ones((2, 2), dtype), "bias": jnp.zeros(2, dtype)} for n in names}


# ---------------------------------------------------------------- layer numbering

def test_natural_key_orders_digits_numerically():
    from dualopt.optax import natural_key

    names = ["layers_10", "layers_2", "layers_1", "head", "layers_02", "Dense_0"]
    assert sorted(names, key=lambda n: natural_key((n,))) == [
        "Dense_0", "head", "layers_1", "layers_02", "layers_2", "layers_10"]  # equal numbers: text decides
    assert natural_key(("a", 3)) < natural_key(("a", 12)) < natural_key(("b", 0))
    assert natural_key(("a",)) < natural_key(("a", "b"))


def test_natural_layer_index_granularities():
    import jax.numpy as jnp

    from dualopt.optax import natural_layer_index

    params = _dense("Dense_10", "Dense_2", "Dense_0")
    assert natural_layer_index(params) == {"Dense_0": {"bias": 0, "kernel": 0}, "Dense_2": {"bias": 1, "kernel": 1},
                                           "Dense_10": {"bias": 2, "kernel": 2}}
    assert natural_layer_index(params, "leaf")["Dense_10"] == {"bias": 4, "kernel": 5}
    nested = {"enc": {"layers_1": {"attn": {"w": jnp.ones(1)}, "mlp": {"w": jnp.ones(1)}},
                      "layers_0": {"attn": {"w": jnp.ones(1)}}}}
    got = natural_layer_index(nested, 2)
    assert got["enc"]["layers_0"]["attn"]["w"] == 0
    assert got["enc"]["layers_1"]["attn"]["w"] == got["enc"]["layers_1"]["mlp"]["w"] == 1
    with pytest.raises(HyperparameterError, match=r"granularity='block' is invalid"):
        natural_layer_index(nested, "block")


def test_default_numbering_is_natural_not_sorted():
    """JAX flattens Dense_10 before Dense_2; scratch rates must still grow with natural depth."""
    from dualopt.optax import dualopt, layer_rates

    params = _dense("Dense_0", "Dense_1", "Dense_2", "Dense_10")
    rates = layer_rates(dualopt(0.1, weight_decay=0.8, layer_index="module"), params)
    assert rates["Dense_2/kernel"] == 0.8 * (3 / 4) and rates["Dense_10/kernel"] == 0.8
    assert rates["Dense_0/bias"] == rates["Dense_0/kernel"] == 0.8 * (1 / 4)
    leaf = layer_rates(dualopt(0.1, weight_decay=0.8), params)  # default: one layer per leaf, canonical order
    order = sorted(leaf, key=leaf.get)  # spec section 3: kernel before bias within a module
    assert order == ["Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias", "Dense_2/kernel",
                     "Dense_2/bias", "Dense_10/kernel", "Dense_10/bias"]
    assert leaf["Dense_10/bias"] == 0.8  # the deepest tensor: the last module's bias


def test_finetune_rates_and_explicit_layer_index():
    from dualopt.optax import dualopt, layer_rates

    params = _dense("b0", "b1", "b2")
    rates = layer_rates(dualopt(0.1, paradigm="finetune", rollback_max=4.0, rollback_min=1.0, layer_index="module"),
                        params)
    assert (rates["b0/kernel"], rates["b1/kernel"], rates["b2/kernel"]) == (4.0, 2.5, 1.0)
    # an explicit pytree of layer keys (keys need not be contiguous), and a function of the path
    explicit = {n: {"kernel": k, "bias": k} for n, k in (("b0", 7), ("b1", 3), ("b2", 3))}
    rates = layer_rates(dualopt(0.1, paradigm="finetune", rollback_max=4.0, layer_index=explicit), params)
    assert (rates["b1/bias"], rates["b0/kernel"]) == (4.0, 0.0)
    fn = lambda path: {"b0": 2, "b1": 1, "b2": 0}[path[0]]  # noqa: E731
    rates = layer_rates(dualopt(0.1, paradigm="finetune", rollback_max=4.0, layer_index=fn), params)
    assert (rates["b2/kernel"], rates["b1/kernel"], rates["b0/bias"]) == (4.0, 2.0, 0.0)


def test_default_rollback_max_uses_base_lr():
    import optax

    from dualopt.optax import dualopt, layer_rates

    params = _dense("a")
    assert layer_rates(dualopt(0.02, paradigm="finetune", layer_index=0), params)["a/kernel"] == 0.01 / 0.02
    sched = optax.linear_schedule(0.05, 0.0, 100)
    assert layer_rates(dualopt(sched, paradigm="finetune", layer_index=0), params)["a/kernel"] == \
        pytest.approx(0.01 / 0.05, rel=1e-7)


# ---------------------------------------------------------------- per-leaf settings

def test_settings_single_prefix_and_function_agree():
    import jax

    from dualopt.optax import anchors, dualopt

    params = {"backbone": _dense("layers_0", "layers_1"), "head": _dense("out")}
    by_prefix = dualopt(0.1, paradigm={"backbone": "finetune", "head": "scratch"},
                        weight_decay={"backbone": 0.0, "head": 0.5}, rollback_max=2.0)
    by_fn = dualopt(0.1, paradigm=lambda p: "finetune" if p[0] == "backbone" else "scratch",
                    weight_decay=lambda p: 0.5 if p[0] == "head" else 0.0, rollback_max=2.0)
    full = jax.tree.map(lambda _: "finetune", params)
    full["head"] = jax.tree.map(lambda _: "scratch", params["head"])
    by_full = dualopt(0.1, paradigm=full, weight_decay={"backbone": 0.0, "head": 0.5}, rollback_max=2.0)
    txs = (by_prefix, by_fn, by_full)
    states = [tx.init(params) for tx in txs]
    shapes = [jax.tree.map(lambda a: a.shape, anchors(tx, s, params)) for tx, s in zip(txs, states)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert list(shapes[0]) == ["backbone"]  # finetune leaves only: the scratch head has no anchor
    assert [jax.tree.structure(s.anchor) for s in states] == [jax.tree.structure({"backbone": params["backbone"]})] * 3
    g = jax.tree.map(jax.numpy.ones_like, params)
    outs = [tx.update(g, s, params)[0] for tx, s in zip((by_prefix, by_fn, by_full), states)]
    for o in outs[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), outs[0], o)


def test_function_receives_plain_key_paths():
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    seen = []
    params = {"layers": [{"w": jnp.ones(1)}, {"w": jnp.ones(1)}], "head": jnp.ones(1)}
    dualopt(0.1, paradigm=lambda path: seen.append(path) or "none").init(params)
    assert set(seen) == {("head",), ("layers", 0, "w"), ("layers", 1, "w")}


def test_explicit_anchor():
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import anchors, dualopt

    params = {"w": jnp.full(3, 2.0), "h": jnp.ones(2)}
    anchor = {"w": jnp.zeros(3), "h": None}
    tx = dualopt(0.5, direction="sgd", momentum=0.0, paradigm={"w": "finetune", "h": "none"}, rollback_max=1.0,
                 anchor=anchor)
    state = tx.init(params)
    np.testing.assert_array_equal(anchors(tx, state, params)["w"], np.zeros(3))
    assert "h" not in anchors(tx, state, params)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    # zero gradient: pre = theta = 2, pulled by c = 0.5 * 1.0 toward the anchor 0 -> 1
    np.testing.assert_array_equal(optax.apply_updates(params, u)["w"], np.ones(3))
    with pytest.raises(HyperparameterError, match=r"anchor\['w'\]=.*is invalid: expected an array of the parameter's shape \(3,\)"):
        dualopt(0.5, paradigm="finetune", anchor={"w": jnp.zeros(4), "h": None}).init(params)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,message", [
    (dict(b1=1.0), "b1=1.0 is invalid: expected a finite number in [0, 1)."),
    (dict(b2=-0.1), "b2=-0.1 is invalid: expected a finite number in [0, 1)."),
    (dict(eps=-1.0), "eps=-1.0 is invalid: expected a finite float >= 0."),
    (dict(direction="adamw"), "direction='adamw' is invalid: expected one of ('adam', 'sgd')."),
    (dict(paradigm="frozen"), "paradigm='frozen' is invalid: expected one of ('scratch', 'finetune', 'none')."),
    (dict(nonfinite="ignore"), "nonfinite='ignore' is invalid: expected one of ('skip', 'propagate')."),
    (dict(weight_decay=200.0), "weight_decay=200.0 is invalid: expected learning_rate * weight_decay <= 1"),
    (dict(paradigm="finetune", rollback_max=500.0), "rollback_max=500.0 is invalid: expected learning_rate"),
    (dict(learning_rate=-1.0), "learning_rate=-1.0 is invalid: expected a finite float >= 0, or an optax schedule."),
    (dict(learning_rate="fast"), "learning_rate='fast' is invalid"),
])
def test_construction_errors(kwargs, message):
    from dualopt.optax import dualopt

    kwargs = {"learning_rate": 0.01, **kwargs}
    with pytest.raises(HyperparameterError) as e:
        dualopt(**kwargs)
    assert str(e.value).startswith(message)


def test_per_leaf_errors_name_the_leaf():
    from dualopt.optax import dualopt

    params = _dense("a", "b")
    with pytest.raises(HyperparameterError, match=r"paradigm='frozen' is invalid: .* \(parameter 'b/bias'\)"):
        dualopt(0.01, paradigm={"a": "scratch", "b": "frozen"}).init(params)
    with pytest.raises(HyperparameterError, match=r"paradigm=.* is invalid: expected a single value, a function"):
        dualopt(0.01, paradigm={"a": "scratch", "c": "none"}).init(params)
    with pytest.raises(HyperparameterError, match=r"layer_index\['b/bias'\]=-1 is invalid: expected a non-negative integer layer key for every tensor"):
        dualopt(0.01, layer_index={"a": 0, "b": -1}).init(params)
    with pytest.raises(HyperparameterError, match=r"layer_index='depth' is invalid"):
        dualopt(0.01, layer_index="depth").init(params)


def test_update_needs_params():
    from dualopt.optax import dualopt

    params = _dense("a")
    tx = dualopt(0.01)
    with pytest.raises(ValueError, match=r"call tx.update\(grads, state, params\)"):
        tx.update(params, tx.init(params))


def test_import_does_not_pull_other_frameworks():
    code = ("import sys, dualopt.optax; bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
            "print('loaded:', bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------- traced bias corrections

def test_x64_bias_corrections_equal_core_bitwise():
    import jax
    import jax.numpy as jnp

    from dualopt.optax._step import adam_scalars

    f = jax.jit(lambda t: adam_scalars(1e-3, 0.9, 0.999, t))
    for t in list(range(1, 400)) + [1000, 4096, 10_000, 123_457]:
        host = adam_coefficients(1e-3, 0.9, 0.999, t)
        for got in (f(jnp.asarray(t, jnp.int32)), adam_scalars(1e-3, 0.9, 0.999, jnp.asarray(t, jnp.int32))):
            assert (float(got.step_size), float(got.inv_sqrt_bc2)) == (host.step_size, host.inv_sqrt_bc2), t


@pytest.mark.parametrize("b1,b2", [(0.9, 0.999), (0.5, 0.9999), (0.0, 0.99)])
def test_float32_bias_corrections_within_3_ulp(b1, b2):
    """Without x64 the scalars are float32: within 3 ulp of the core's float64 values rounded to float32
    (the direct 1 - b2**t in float32 is 1e-4 off for b2 = 0.9999)."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax._step import adam_scalars

    ts = np.unique(np.geomspace(1, 200_000, 3000).astype(np.int32))
    with jax.enable_x64(False):
        got = jax.jit(lambda t: adam_scalars(1e-3, b1, b2, t))(jnp.asarray(ts))
        got = [np.asarray(x) for x in got]
    assert got[0].dtype == np.float32
    host = np.array([adam_coefficients(1e-3, b1, b2, int(t)) for t in ts]).astype(np.float32)
    for g, h in zip(got, host.T):
        ulp = np.abs(g.view(np.int32).astype(np.int64) - h.view(np.int32).astype(np.int64))
        assert ulp.max() <= 3, ulp.max()
    assert math.isfinite(float(got[1][-1]))
