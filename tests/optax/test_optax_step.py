"""The update of dualopt.optax (``_step.step_leaves``) against the core, and the shape of its compiled program.

``step_leaves`` calls the core's ``step_tensor`` per leaf with ``keep`` (the
non-finite select) and the Adam scalars computed once per step on the device.
These tests prove that the result is the core's host step bit for bit, that a
skipped step keeps every bit, that the non-finite flag is the core's, and that
the compiled update keeps the memory traffic and program size the fast path
exists for. The traffic is XLA's own static count of bytes read and written
(``compiled.cost_analysis()``), not a timing: it is deterministic for the
pinned jax/jaxlib (requirements-lock.txt).
"""

from __future__ import annotations

import numpy as np
import pytest

import decoupled_core as core


def _arrays(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(shape).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    m = (0.1 * rng.standard_normal(shape)).astype(dtype)
    v = np.abs(0.01 * rng.standard_normal(shape)).astype(dtype)
    m.flat[0] = -0.0  # signed zeros must survive a skipped step
    return theta, grad, m, v


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


HPS = {"adam-finetune": core.HyperParams(beta1=0.8, beta2=0.99, eps=1e-7, paradigm="finetune", rollback_max=2.0),
       "sgd-nesterov-scratch": core.HyperParams(direction="sgd", momentum=0.7, nesterov=True, weight_decay=0.5),
       "sgd-none": core.HyperParams(direction="sgd", momentum=0.7, paradigm="none")}


def _leaf(hp, dtype, seed=1):
    import jax.numpy as jnp

    from dualopt.optax._config import LeafConfig

    theta, grad, m, v = (jnp.asarray(x) for x in _arrays(seed, (7, 5), dtype))
    anchor = jnp.asarray(_arrays(seed + 1, (7, 5), dtype)[0]) if hp.paradigm == "finetune" else None
    if hp.direction == "sgd":
        v = jnp.zeros((0, 0), v.dtype)
    return LeafConfig(hp, 1.5 if hp.paradigm != "none" else 0.0, ("w",)), theta, grad, m, v, anchor


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("keep", [None, True])
@pytest.mark.parametrize("name", list(HPS))
def test_step_leaves_is_the_cores_host_step(dtype, keep, name):
    """Eager, x64 on: the new params, moments and updates of ``step_leaves`` equal the core's ``step_tensor``
    with the host's float64 scalars, bit for bit, for ``keep`` absent or true."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax._step import step_leaves

    hp = HPS[name]
    with jax.enable_x64(True):
        cfg, theta, grad, m, v, anchor = _leaf(hp, dtype)
        state = core.AdamState(m, v) if hp.direction == "adam" else core.SGDState(m)
        want, want_state = core.step_tensor(theta, grad, state, anchor, hp=hp, lr=3e-3, step=4, rate=cfg.rate,
                                            xp=jnp)
        flag = None if keep is None else jnp.asarray(keep)
        t = jnp.asarray(4, jnp.int32)
        for output in ("params", "updates"):
            out, mu, nu = step_leaves([cfg], [theta], [grad], [m], [v], [anchor], lr=3e-3, t=t, keep=flag,
                                      output=output)
            assert _bits_equal(out[0], want if output == "params" else want - theta), output
            assert _bits_equal(mu[0], want_state[0])
            assert _bits_equal(nu[0], want_state[1] if hp.direction == "adam" else v)
        assert not np.array_equal(np.asarray(want), np.asarray(theta))


@pytest.mark.parametrize("name", list(HPS))
def test_skipped_step_keeps_every_bit(name):
    """``keep`` false, eager and jitted, float32, gradients with NaN and -Inf: the moments are the old ones bit
    for bit (a -0.0 keeps its sign), the updates are -0.0 (``p + -0.0 == p``, also for ``p == -0.0``) and the
    ``"params"`` output is the old param."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax._step import step_leaves

    hp = HPS[name]
    cfg, theta, grad, m, v, anchor = _leaf(hp, np.float32, seed=3)
    grad = grad.at[0, 2].set(jnp.nan).at[3, 4].set(-jnp.inf)
    theta = theta.at[0, 0].set(-0.0)

    def run(theta, grad, m, v, anchor, output):
        return step_leaves([cfg], [theta], [grad], [m], [v], [anchor], lr=1e-2, t=jnp.asarray(2, jnp.int32),
                           keep=jnp.asarray(False), output=output)

    for fn in (run, jax.jit(run, static_argnums=5)):
        for output in ("params", "updates"):
            out, mu, nu = fn(theta, grad, m, v, anchor, output)
            assert _bits_equal(mu[0], m) and _bits_equal(nu[0], v)
            assert np.signbit(np.asarray(mu[0]).flat[0])
            if output == "params":
                assert _bits_equal(out[0], theta)
            else:
                assert _bits_equal(out[0], jnp.full(theta.shape, -0.0, theta.dtype))
                assert _bits_equal(theta + out[0], theta)


@pytest.mark.parametrize("variant", ["all_finite", "all_finite_cpu", "all_finite_one_pass"])
@pytest.mark.parametrize("jit", [False, True])
def test_all_finite_is_the_cores(jit, variant):
    """NaN, +Inf and -Inf anywhere (first, middle, last leaf; 0-d, zero-size, bfloat16, float64, and finite
    float32 values whose sum overflows, which the CPU variant's fast sum must not mistake for Inf) against
    the core's check; both platform variants are checked here on CPU."""
    import jax
    import jax.numpy as jnp

    import dualopt._shared.jax as step

    fn = getattr(step, variant)
    fn = jax.jit(fn) if jit else fn
    all_finite = step.all_finite
    base = [np.full((3, 4), 3e38, np.float32), np.zeros((0, 2), np.float32), np.float64(1.5) * np.ones(()),
            np.ones(5, jnp.bfloat16), np.linspace(-1, 1, 2000).astype(np.float64)]
    with np.errstate(over="ignore"):
        assert not np.isfinite(base[0].sum(dtype=np.float32))
    if variant != "all_finite":
        base = [g for g in base if g.size]  # the platform variants get the non-empty gradients
    assert bool(fn([jnp.asarray(g) for g in base])) is True
    assert bool(core.all_finite([jnp.asarray(g) for g in base], xp=jnp)) is True
    for leaf in range(len(base)):
        for where in (0, -1):
            for bad in (np.nan, np.inf, -np.inf):
                grads = [np.array(g, copy=True) for g in base]
                if not grads[leaf].size:
                    continue
                flat = grads[leaf].reshape(-1)
                flat[where] = bad
                grads[leaf] = flat.reshape(grads[leaf].shape)
                arrays = [jnp.asarray(g) for g in grads]
                assert bool(fn(arrays)) is False, (leaf, where, bad)
                assert bool(core.all_finite(arrays, xp=jnp)) is False
    assert bool(all_finite([jnp.zeros((0,))])) is True


@pytest.mark.parametrize("jit", [False, True])
def test_all_finite_refuses_a_negative_count(jit):
    """``count`` joins the one reduction: a negative step count reads as non-finite, with or without gradients
    (and without becoming a per-leaf ``and`` fused into every select)."""
    import jax
    import jax.numpy as jnp

    from dualopt._shared.jax import all_finite

    fn = jax.jit(all_finite) if jit else all_finite
    grads = [jnp.ones((3, 2)), jnp.zeros((0,))]
    for count, want in ((0, True), (7, True), (-1, False), (-(2**31), False)):
        for gs in (grads, [], [jnp.ones(2).at[1].set(jnp.nan)]):
            got = bool(fn(gs, count=jnp.asarray(count, jnp.int32)))
            assert got is (want and all(bool(jnp.isfinite(g).all()) for g in gs)), (count, gs)


def _compiled(tx, params):
    import jax
    import optax

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    grads = jax.tree.map(lambda p: p * 1e-3, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()


def _bytes(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["bytes accessed"])


def test_compiled_traffic_is_adamws_plus_the_extra_reads():
    """float32, x64 off, 4 x 256^2: optax.adamw moves 40 bytes per element on XLA:CPU
    (m, v and the params in three loops). DualOpt moves the same with ``nonfinite="propagate"``, 4 more for
    the finite check (one read of the gradients; cost_analysis counts 4 more, the operands of the lax.cond
    whose exact fallback runs only when a gradient's sum is not finite) and 4 more per finetune element (the
    anchor; rollback_min > 0, so that the deepest layer pulls too). Before the moments were selected
    ahead of the pre-weight, "skip" moved 66 bytes per element (copies of m and v, a boolean array)."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    with jax.enable_x64(False):
        params = {f"layers_{i}": {"kernel": jnp.ones((256, 256), jnp.float32)} for i in range(4)}
        n = 4 * 256 * 256
        per_elt = lambda tx: _bytes(_compiled(tx, params)) / n  # noqa: E731
        adamw = per_elt(optax.adamw(1e-3, weight_decay=1e-2))
        assert adamw == pytest.approx(40.0, abs=0.1)
        expected = {("scratch", "propagate"): 0.0, ("scratch", "skip"): 8.0, ("finetune", "propagate"): 4.0,
                    ("finetune", "skip"): 12.0}
        for (paradigm, policy), extra in expected.items():
            got = per_elt(dualopt(1e-3, paradigm=paradigm, rollback_max=1.0, rollback_min=0.5, nonfinite=policy))
            assert got == pytest.approx(adamw + extra, abs=0.1), (paradigm, policy, got)


def test_compiled_program_grows_linearly_with_leaves():
    """The non-finite flag reaches the selects as one scalar: a chain of per-leaf flags fused into every
    select made the program (and compile time) quadratic in the number of leaves (2000 leaves took >10 min)."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    def size(n):
        params = {f"layers_{i}": {"kernel": jnp.ones((4, 4), jnp.float32)} for i in range(n)}
        return len(_compiled(dualopt(1e-3, layer_index=0), params).as_text())

    with jax.enable_x64(False):
        small, large = size(8), size(32)
    assert large < 5.0 * small, (small, large)  # linear: ~4x; quadratic: ~16x
