"""dualopt.optax against other optimizers: Optax's own Adam/SGD at rho = 0, and the core's reference
optimizer on a pure-JAX MLP trained for a few hundred float64 steps."""

from __future__ import annotations

import numpy as np
import pytest

from decoupled_core import HyperParams, ReferenceOptimizer

from tests.optax._optax_helpers import mlp_params


def _run(tx, params, grads_fn, steps):
    import jax
    import optax

    state = tx.init(params)

    @jax.jit
    def step(params, state, k):
        updates, state = tx.update(grads_fn(params, k), state, params)
        return optax.apply_updates(params, updates), state

    for k in range(steps):
        params, state = step(params, state, k)
    return params


def _grads_fn(params0):
    """Deterministic gradients that depend on the params (a quadratic bowl plus a step-dependent wobble)."""
    import jax
    import jax.numpy as jnp

    target = jax.tree.map(lambda p: jnp.cos(3.0 * p), params0)

    def fn(params, k):
        return jax.tree.map(lambda p, c: (p - c) * (1.0 + 0.5 * jnp.sin(0.3 * k)) + 0.01 * jnp.cos(k + p), params, target)

    return fn


# rho = 0 three ways: no pull at all, scratch with weight_decay = 0, finetune with both rollback bounds 0.
RHO_ZERO = {"none": dict(paradigm="none"), "scratch-wd0": dict(paradigm="scratch", weight_decay=0.0),
            "finetune-k0": dict(paradigm="finetune", rollback_max=0.0, rollback_min=0.0)}


@pytest.mark.parametrize("rho_zero", RHO_ZERO)
@pytest.mark.parametrize("lr", [1e-2, "schedule"])
def test_rho_zero_equals_optax_adam(lr, rho_zero):
    import jax
    import optax

    from dualopt.optax import dualopt

    params = jax.tree.map(jax.numpy.asarray, mlp_params())
    if lr == "schedule":
        lr = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 100)
    fn = _grads_fn(params)
    ours = _run(dualopt(lr, eps=1e-8, **RHO_ZERO[rho_zero]), params, fn, 100)
    ref = _run(optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8), params, fn, 100)
    # Different but equivalent order of operations (Optax divides by the bias
    # corrections, the spec multiplies by host reciprocals): float64 round-off only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), ours, ref)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(ours), jax.tree.leaves(params)))
    assert moved > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("rho_zero", ["none", "scratch-wd0"])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_rho_zero_equals_optax_sgd(momentum, nesterov, rho_zero):
    import jax
    import optax

    from dualopt.optax import dualopt

    params = jax.tree.map(jax.numpy.asarray, mlp_params(1))
    fn = _grads_fn(params)
    ours = _run(dualopt(0.05, direction="sgd", momentum=momentum, nesterov=nesterov, **RHO_ZERO[rho_zero]),
                params, fn, 100)
    ref = _run(optax.sgd(0.05, momentum=momentum or None, nesterov=nesterov), params, fn, 100)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), ours, ref)


def _loss(params, x, y):
    import jax.numpy as jnp
    import optax

    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = jnp.tanh(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_mlp_matches_reference_optimizer(direction):
    """300 float64 steps of a 4-layer MLP (backbone finetune, head scratch, cosine schedule, Dense_10
    sorted before Dense_2 by JAX): the core's ReferenceOptimizer, fed the same gradients in natural
    layer order, lands on the same weights."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt, leaf_paths, natural_layer_index

    rng = np.random.default_rng(3)
    sizes = (5, 8, 8, 8, 3)
    # Name the layers Dense_0, Dense_1, Dense_2, Dense_10 so that sorted order != depth order.
    names = ["Dense_0", "Dense_1", "Dense_2", "Dense_10"]
    base = mlp_params(3, sizes)
    params = {names[i]: base[f"Dense_{i}"] for i in range(4)}
    x = jnp.asarray(rng.standard_normal((64, sizes[0])))
    y = jnp.asarray(rng.integers(0, sizes[-1], 64))

    def loss(params, x, y):
        return _loss({f"Dense_{i}": params[n] for i, n in enumerate(names)}, x, y)

    schedule = optax.cosine_decay_schedule(0.02 if direction == "adam" else 0.2, 300, alpha=0.1)
    paradigm = lambda path: "scratch" if path[0] == "Dense_10" else "finetune"  # noqa: E731
    tx = dualopt(schedule, direction=direction, paradigm=paradigm, rollback_max=4.0, rollback_min=0.5,
                 rollback_power=2.0, weight_decay=0.3, layer_index="module")
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    leaves0, treedef = jax.tree.flatten(params)
    paths = leaf_paths(params)
    hps = [HyperParams(direction=direction, paradigm=paradigm(p), rollback_max=4.0, rollback_min=0.5,
                       rollback_power=2.0, weight_decay=0.3) for p in paths]
    keys = jax.tree.leaves(natural_layer_index(params, "module"))
    assert [keys[paths.index((n, "kernel"))] for n in names] == [0, 1, 2, 3]
    ref = ReferenceOptimizer([np.asarray(p) for p in leaves0], hps, base_lr=float(schedule(0)), layer_index=keys)
    scale = max(float(np.abs(np.asarray(p)).max()) for p in leaves0)
    for k in range(300):
        batch = slice((k % 4) * 16, (k % 4 + 1) * 16)
        params, state, grads = step(params, state, x[batch], y[batch])
        assert ref.step([np.asarray(g) for g in jax.tree.leaves(grads)], float(schedule(k)))
        got = [np.asarray(p) for p in jax.tree.leaves(params)]
        err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref.params))
        assert err <= 4 * np.finfo(np.float64).eps * (k + 1) * scale, (k, err)
    moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(ref.params, leaves0))
    assert moved > 0.05
    assert int(state.count) == 300
