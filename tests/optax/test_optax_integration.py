"""dualopt.optax inside the Optax ecosystem: jit without retracing, optax.chain, inject_hyperparams,
MultiSteps, partition and apply_if_finite, each checked on values."""

from __future__ import annotations

import numpy as np
import pytest

from decoupled_core import HyperParams, ReferenceOptimizer, layer_rates

from _optax_helpers import mlp_params, tree_equal

RTOL = 1e-13  # float64, two jitted programs that may fuse differently


def _params():
    import jax

    return jax.tree.map(jax.numpy.asarray, mlp_params(7))


def _grads(k, params, scale=1.0):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(100 + k)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(p.shape)) for p in leaves])


def _loop(tx, params, grads_seq, jit=True):
    import jax
    import optax

    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def _close(a, b, rtol=RTOL):
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-15), a, b)


MIXED = dict(paradigm=lambda path: "scratch" if path[0] == "Dense_2" else "finetune", rollback_max=3.0,
             weight_decay=0.5, layer_index="module")


def test_second_call_does_not_retrace():
    import jax
    import optax

    from dualopt.optax import dualopt

    tx = dualopt(optax.linear_schedule(1e-2, 1e-3, 10), **MIXED)
    params = _params()
    state = tx.init(params)
    traces = []

    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jstep = jax.jit(step, donate_argnums=(0, 1))
    for k in range(4):
        params, state = jstep(params, state, _grads(k, params))
    assert len(traces) == 1
    assert jstep._cache_size() == 1
    assert int(state.count) == 4


def test_chain_after_clip_by_global_norm():
    import jax
    import optax

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params, scale=3.0) for k in range(6)]
    assert all(float(optax.tree.norm(g)) > 1.0 for g in grads)  # clipping is active
    chained, state = _loop(optax.chain(optax.clip_by_global_norm(1.0), dualopt(1e-2, **MIXED)), params, grads)

    def clip(g):
        norm = np.sqrt(sum(float(np.sum(np.asarray(x) ** 2)) for x in jax.tree.leaves(g)))
        return jax.tree.map(lambda x: x * (1.0 / norm), g)

    direct, _ = _loop(dualopt(1e-2, **MIXED), params, [clip(g) for g in grads])
    _close(chained, direct, rtol=1e-12)
    assert int(state[1].count) == 6


def _inject(**kw):
    import optax

    from dualopt.optax import dualopt

    return optax.inject_hyperparams(dualopt, static_args=("paradigm",))(**kw)


def test_inject_hyperparams_unchanged():
    """Same arguments with and without inject_hyperparams: bit-identical results."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(8)]
    # A float64 schedule of exact operations: Optax's built-in schedules return float32, whose
    # pow can differ by an ulp between two XLA programs (that would test the schedule, not dualopt).
    schedule = lambda count: jnp.where(count < 4, 2e-2, 5e-3) * (1.0 + 0.125 * count)  # noqa: E731
    for kw in (dict(learning_rate=1e-2, **MIXED), dict(learning_rate=schedule, **MIXED),
               dict(learning_rate=0.05, direction="sgd", nesterov=True, **MIXED)):
        plain, _ = _loop(dualopt(**kw), params, grads)
        injected, state = _loop(_inject(**kw), params, grads)
        assert tree_equal(plain, injected)
        assert int(state.inner_state.count) == 8
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                    zip(jax.tree.leaves(plain), jax.tree.leaves(params)))
        assert moved > 1e-3


def test_inject_hyperparams_changed_at_run_time():
    """Changing learning_rate and weight_decay in the state after 4 steps equals the core reference
    whose lr and rates change at the same step."""
    import jax
    import optax

    params = _params()
    grads = [_grads(k, params) for k in range(8)]
    tx = _inject(learning_rate=1e-2, **MIXED)
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    from dualopt.optax import leaf_paths, natural_layer_index

    paths = leaf_paths(params)
    keys = jax.tree.leaves(natural_layer_index(params, "module"))

    def hps(wd):
        return [HyperParams(paradigm=MIXED["paradigm"](p), rollback_max=3.0, weight_decay=wd) for p in paths]

    ref = ReferenceOptimizer([np.asarray(p) for p in jax.tree.leaves(params)], hps(0.5), base_lr=1e-2,
                             layer_index=keys)
    p = params
    for k, g in enumerate(grads):
        if k == 4:
            state.hyperparams["learning_rate"] = 4e-3
            state.hyperparams["weight_decay"] = 2.0
            ref.hps = hps(2.0)
            ref.rates = layer_rates(ref.hps, keys)
        p, state = step(p, state, g)
        ref.step([np.asarray(x) for x in jax.tree.leaves(g)], 1e-2 if k < 4 else 4e-3)
        for a, b in zip(jax.tree.leaves(p), ref.params):
            np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=1e-15)


def test_inject_hyperparams_needs_explicit_rollback_max():
    from decoupled_core import HyperparameterError

    tx = _inject(learning_rate=1e-2, paradigm="finetune")
    with pytest.raises(HyperparameterError, match=r"rollback_max=None is invalid: expected an explicit value"):
        tx.init(_params())


def test_multisteps_averages_then_steps():
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(8)]
    acc, state = _loop(optax.MultiSteps(dualopt(1e-2, **MIXED), every_k_schedule=2, accumulator_dtype=jnp.float64),
                       params, grads)
    mean = [jax.tree.map(lambda a, b: (a + b) * 0.5, grads[i], grads[i + 1]) for i in range(0, 8, 2)]
    direct, _ = _loop(dualopt(1e-2, **MIXED), params, mean)
    _close(acc, direct, rtol=1e-12)
    assert int(state.inner_opt_state.count) == 4


def test_partition_equals_one_transform():
    """Per-paradigm numbering makes two partitioned transforms agree with one transform whose
    paradigm is chosen per leaf (finite gradients, so the separate finite checks agree too)."""
    import optax

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(6)]
    labels = {k: ("head" if k == "Dense_2" else "body") for k in params}
    part = optax.partition({"body": dualopt(1e-2, paradigm="finetune", rollback_max=3.0, layer_index="module"),
                            "head": dualopt(1e-2, paradigm="scratch", weight_decay=0.5, layer_index="module")}, labels)
    got, state = _loop(part, params, grads)
    want, _ = _loop(dualopt(1e-2, **MIXED), params, grads)
    _close(got, want)
    body_state = state.inner_states["body"].inner_state
    assert int(body_state.count) == 6
    assert body_state.anchor["Dense_0"]["kernel"].shape == params["Dense_0"]["kernel"].shape


@pytest.mark.parametrize("inner_policy", ["propagate", "skip"])
def test_apply_if_finite(inner_policy):
    """A NaN gradient is dropped by the wrapper (params and inner state keep their bits); the run
    equals DualOpt on the finite gradients alone."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(6)]
    bad = jax.tree.map(lambda g: g, grads[2])
    bad["Dense_1"]["bias"] = bad["Dense_1"]["bias"].at[0].set(jnp.nan)
    tx = optax.apply_if_finite(dualopt(1e-2, nonfinite=inner_policy, **MIXED), 3)
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = params
    for k, g in enumerate(grads[:2] + [bad] + grads[2:]):
        before_p, before_inner = p, state.inner_state
        p, state = step(p, state, g)
        if k == 2:
            assert tree_equal(p, before_p) and tree_equal(state.inner_state, before_inner)
            assert int(state.notfinite_count) == 1
    want, want_state = _loop(dualopt(1e-2, nonfinite=inner_policy, **MIXED), params, grads)
    _close(p, want)
    assert int(state.total_notfinite) == 1
    assert int(state.inner_state.count) == int(want_state.count) == 6
