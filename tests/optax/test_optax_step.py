"""The update kernel of dualopt.optax (``_optax_step``) against the core, and the shape of its compiled program.

``_optax_step`` repeats the core's direction op sequence so that, under
``nonfinite="skip"``, the moments are selected before the pre-weight reads them
(see its module docstring). These tests prove that the repetition is the core's
arithmetic bit for bit, that the non-finite flag is the core's, and that the
compiled update keeps the memory traffic and program size the fast path exists
for. The traffic is XLA's own static count of bytes read and written
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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ok", [None, True])
def test_adam_pre_weight_is_the_cores(dtype, ok):
    import jax.numpy as jnp

    from dualopt.optax._step import adam_pre_weight

    theta, grad, m, v = _arrays(1, (7, 5), dtype)
    coeffs = core.adam_coefficients(3e-3, 0.8, 0.99, 4)
    kw = dict(beta1=0.8, beta2=0.99, eps=1e-7, step_size=coeffs.step_size, inv_sqrt_bc2=coeffs.inv_sqrt_bc2)
    want_pre, want = core.adam_pre_weight(jnp.asarray(theta), jnp.asarray(grad), core.AdamState(jnp.asarray(m),
                                          jnp.asarray(v)), xp=jnp, **kw)
    flag = None if ok is None else jnp.asarray(ok)
    pre, m2, v2 = adam_pre_weight(jnp.asarray(theta), jnp.asarray(grad), jnp.asarray(m), jnp.asarray(v), flag, **kw)
    assert _bits_equal(pre, want_pre) and _bits_equal(m2, want.exp_avg) and _bits_equal(v2, want.exp_avg_sq)
    assert not np.array_equal(np.asarray(pre), theta)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("ok", [None, True])
def test_sgd_pre_weight_is_the_cores(nesterov, ok):
    import jax.numpy as jnp

    from dualopt.optax._step import sgd_pre_weight

    theta, grad, buf, _ = _arrays(2, (4, 3), np.float64)
    want_pre, want = core.sgd_pre_weight(jnp.asarray(theta), jnp.asarray(grad), core.SGDState(jnp.asarray(buf)),
                                         lr=0.05, momentum=0.7, nesterov=nesterov, xp=jnp)
    flag = None if ok is None else jnp.asarray(ok)
    pre, buf2 = sgd_pre_weight(jnp.asarray(theta), jnp.asarray(grad), jnp.asarray(buf), flag, lr=0.05, momentum=0.7,
                               nesterov=nesterov)
    assert _bits_equal(pre, want_pre) and _bits_equal(buf2, want.momentum_buffer)


def test_not_ok_keeps_the_old_moments_bitwise():
    import jax
    import jax.numpy as jnp

    from dualopt.optax._step import adam_pre_weight, sgd_pre_weight

    theta, grad, m, v = _arrays(3, (6,), np.float32)
    grad[2] = np.nan
    grad[4] = -np.inf
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-2, inv_sqrt_bc2=31.6)
    for fn in (lambda *a: adam_pre_weight(*a, **kw), jax.jit(lambda *a: adam_pre_weight(*a, **kw))):
        _, m2, v2 = fn(jnp.asarray(theta), jnp.asarray(grad), jnp.asarray(m), jnp.asarray(v), jnp.asarray(False))
        assert _bits_equal(m2, m) and _bits_equal(v2, v)
        assert np.signbit(np.asarray(m2)[0])
    _, b2 = sgd_pre_weight(jnp.asarray(theta), jnp.asarray(grad), jnp.asarray(m), jnp.asarray(False), lr=0.1,
                           momentum=0.9, nesterov=True)
    assert _bits_equal(b2, m)


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
