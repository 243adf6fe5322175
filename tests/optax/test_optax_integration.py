"""dualopt.optax inside the Optax ecosystem: jit without retracing, optax.chain, inject_hyperparams,
MultiSteps, partition and apply_if_finite, each checked on values."""

from __future__ import annotations

import numpy as np
import pytest

from decoupled_core import HyperParams, ReferenceOptimizer, layer_rates

from tests.optax._optax_helpers import mlp_params, tree_equal

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
    grads = [_grads(k, params) for k in range(4)]
    eager, _ = _loop(tx, params, grads, jit=False)
    params = jax.tree.map(jax.numpy.copy, params)  # donated below
    for g in grads:
        params, state = jstep(params, state, g)
    assert len(traces) == 1
    assert jstep._cache_size() == 1
    assert int(state.count) == 4
    _close(params, eager)  # and the compiled steps compute what the eager ones do


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


def _max_scaled_gap(a, b, ref):
    import jax

    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(ref))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


def test_inject_hyperparams_unchanged():
    """Same arguments with and without inject_hyperparams: bit-identical results eagerly, and under jax.jit
    within the "xla-jit" budget of 4 eps per step.

    Eagerly every operation runs on its own, so this proves the arithmetic is the same whether a
    hyperparameter is a host float or an injected array. Under jit XLA:CPU contracts multiply-adds into
    FMAs per compiled loop, and a program whose coefficients are constants is not always contracted like
    one whose coefficients are parameters (a last-bit difference on scratch leaves, seen with and without
    the non-finite check), so two different programs are only compared within the jit budget.
    """
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(8)]
    # A float64 schedule of exact operations: Optax's built-in schedules return float32, whose
    # pow can differ by an ulp between two XLA programs (that would test the schedule, not dualopt).
    schedule = lambda count: jnp.where(count < 4, 2e-2, 5e-3) * (1.0 + 0.125 * count)  # noqa: E731
    for kw in (dict(learning_rate=1e-2, **MIXED), dict(learning_rate=schedule, **MIXED),
               dict(learning_rate=0.05, direction="sgd", nesterov=True, **MIXED),
               dict(learning_rate=1e-2, nonfinite="propagate", **MIXED)):
        plain, _ = _loop(dualopt(**kw), params, grads, jit=False)
        injected, state = _loop(_inject(**kw), params, grads, jit=False)
        assert tree_equal(plain, injected)
        assert int(state.inner_state.count) == 8
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                    zip(jax.tree.leaves(plain), jax.tree.leaves(params)))
        assert moved > 1e-3
        jit_plain, _ = _loop(dualopt(**kw), params, grads)
        jit_injected, _ = _loop(_inject(**kw), params, grads)
        budget = 4 * np.finfo(np.float64).eps * len(grads)
        assert _max_scaled_gap(jit_plain, plain, plain) <= budget
        assert _max_scaled_gap(jit_injected, plain, plain) <= budget


def test_inject_hyperparams_float32_params():
    """float32 params: inject_hyperparams casts numeric arguments to the params' dtype, so b1 = 0.9 becomes
    float32(0.9) and 1 - b1 is off by 2.4e-7 relative from the host's 1 - 0.9 (optax.adam's own b1 has the
    same property). Injected in float64 (``hyperparam_dtype``, x64 on) the result is the plain transform's
    bit for bit, eagerly; in float32 it stays within a few float32 ulps per step of it."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    params = jax.tree.map(lambda p: p.astype(jnp.float32), _params())
    grads = [jax.tree.map(lambda g: g.astype(jnp.float32), _grads(k, params)) for k in range(6)]
    plain, _ = _loop(dualopt(1e-2, **MIXED), params, grads, jit=False)
    wide = optax.inject_hyperparams(dualopt, static_args=("paradigm",), hyperparam_dtype=jnp.float64)
    injected, state = _loop(wide(learning_rate=1e-2, **MIXED), params, grads, jit=False)
    assert tree_equal(plain, injected)
    assert state.hyperparams["b1"].dtype == jnp.float64
    narrow, state = _loop(_inject(learning_rate=1e-2, **MIXED), params, grads, jit=False)
    assert state.hyperparams["b1"].dtype == jnp.float32
    for leaf in jax.tree.leaves(narrow):
        assert leaf.dtype == jnp.float32
    gap = _max_scaled_gap(narrow, plain, plain)
    assert 0 < gap <= 4 * np.finfo(np.float32).eps * len(grads), gap


def test_inject_hyperparams_label_functions_and_rates_changed_at_run_time():
    """paradigm and layer_index given as functions of the key path (through ``static_args``: Optax treats
    every other callable as a schedule); lr, weight_decay and the three rollback rates changed in the state
    after 3 steps. Equals the core's reference whose rates change at the same step, and changing them (to
    arrays of the injected dtype) does not recompile the step."""
    import jax
    import optax

    from dualopt.optax import dualopt, leaf_paths

    params = _params()
    grads = [_grads(k, params) for k in range(7)]
    paradigm = lambda path: "scratch" if path[0] == "Dense_2" else "finetune"  # noqa: E731
    depth = lambda path: {"Dense_0": 5, "Dense_1": 9, "Dense_2": 0}[path[0]] + (path[1] == "bias")  # noqa: E731
    rates = dict(weight_decay=0.5, rollback_max=3.0, rollback_min=0.5, rollback_power=2.0)
    tx = optax.inject_hyperparams(dualopt, static_args=("paradigm", "layer_index"))(
        learning_rate=1e-2, paradigm=paradigm, layer_index=depth, **rates)
    state = tx.init(params)
    traces = []

    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step)
    paths = leaf_paths(params)
    keys = [depth(q) for q in paths]

    def hps(r):
        return [HyperParams(paradigm=paradigm(q), **r) for q in paths]

    ref = ReferenceOptimizer([np.asarray(p) for p in jax.tree.leaves(params)], hps(rates), base_lr=1e-2,
                             layer_index=keys)
    assert ref.rates[paths.index(("Dense_0", "kernel"))] == 3.0  # the shallowest finetune key pulls hardest
    changed = dict(weight_decay=1.5, rollback_max=6.0, rollback_min=1.0, rollback_power=0.5)
    p = params
    for k, g in enumerate(grads):
        if k == 3:
            # Arrays of the injected dtype: a Python float has another abstract type and would retrace once.
            for name, value in dict(learning_rate=5e-3, **changed).items():
                state.hyperparams[name] = jax.numpy.asarray(value, state.hyperparams[name].dtype)
            ref.hps = hps(changed)
            ref.rates = layer_rates(ref.hps, keys)
        p, state = step(p, state, g)
        ref.step([np.asarray(x) for x in jax.tree.leaves(g)], 1e-2 if k < 3 else 5e-3)
        for a, b in zip(jax.tree.leaves(p), ref.params):
            np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=1e-15)
    assert len(traces) == 1
    assert int(state.inner_state.count) == 7


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

    from dualopt.optax import anchors, dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(6)]
    labels = {k: ("head" if k == "Dense_2" else "body") for k in params}
    part_body = dualopt(1e-2, paradigm="finetune", rollback_max=3.0, layer_index="module")
    part = optax.partition({"body": part_body,
                            "head": dualopt(1e-2, paradigm="scratch", weight_decay=0.5, layer_index="module")}, labels)
    got, state = _loop(part, params, grads)
    want, _ = _loop(dualopt(1e-2, **MIXED), params, grads)
    _close(got, want)
    body_state = state.inner_states["body"].inner_state
    assert int(body_state.count) == 6
    masked = {**params, "Dense_2": optax.MaskedNode()}  # what optax.partition hands the body's transform
    body_anchors = anchors(part_body, body_state, masked)
    assert sorted(body_anchors) == ["Dense_0", "Dense_1"]
    assert body_anchors["Dense_0"]["kernel"].shape == params["Dense_0"]["kernel"].shape


def test_partition_with_optax_adamw_for_the_head():
    """The usual split: DualOpt finetune on the backbone, optax.adamw on the new head. Each part equals its
    transform run on that part alone (optax.partition hands DualOpt the params with the head masked out,
    so DualOpt numbers only the backbone's layers)."""
    import optax

    from dualopt.optax import anchors, dualopt

    params = _params()
    grads = [_grads(k, params) for k in range(5)]
    labels = {k: ("head" if k == "Dense_2" else "backbone") for k in params}
    backbone = dualopt(1e-2, paradigm="finetune", rollback_max=3.0, layer_index="module")
    part = optax.partition({"backbone": backbone, "head": optax.adamw(1e-2, weight_decay=0.1)}, labels)
    got, state = _loop(part, params, grads)
    body = {k: v for k, v in params.items() if k != "Dense_2"}
    want_body, _ = _loop(backbone, body, [{k: g[k] for k in body} for g in grads])
    want_head, _ = _loop(optax.adamw(1e-2, weight_decay=0.1), params["Dense_2"], [g["Dense_2"] for g in grads])
    _close({k: got[k] for k in body}, want_body)
    _close(got["Dense_2"], want_head)
    inner = state.inner_states["backbone"].inner_state
    masked = {**body, "Dense_2": optax.MaskedNode()}
    assert int(inner.count) == 5
    np.testing.assert_array_equal(anchors(backbone, inner, masked)["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


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
