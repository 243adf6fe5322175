"""The C kernels of ``dualopt._optax_native``: the spec's arithmetic bit for bit, where they run, and fallbacks.

The kernel evaluates ``decoupled_core.rule.adam_pre_weight`` and ``pull``
operation for operation without FMA contraction and with IEEE gradual
underflow, so :func:`dualopt.optax.step` must equal the core evaluated with
numpy exactly (x64 on, so that the jitted bias corrections equal the host's:
``_optax_step.adam_scalars``). Leaf counts straddle the kernel's chunks
(``CHUNK`` tensors per call) and sizes its threading threshold.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dualopt._optax_native as native  # noqa: E402
from decoupled_core import HyperParams, ReferenceOptimizer  # noqa: E402
from dualopt.optax import dualopt, leaf_paths, natural_layer_index, step  # noqa: E402

from _optax_helpers import tree_equal  # noqa: E402

HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_native = pytest.mark.skipif(native.library() is None, reason=f"C kernels: {native.native_status()['reason']}")


@pytest.mark.skipif(not HAVE_CC or os.environ.get("DUALOPT_NATIVE") == "0", reason="no C compiler here")
def test_the_kernels_build_where_there_is_a_compiler():
    status = native.native_status()
    assert status["enabled"], status["reason"]
    assert native.usable()  # the test process: JAX's CPU backend, one device


def _params(n: int, dtype, seed: int = 0, sizes=None) -> dict:
    """``n`` leaves ``layers_i/w``: a 0-d leaf, a zero-size one, then vectors and matrices of mixed sizes."""
    rng = np.random.default_rng(seed)
    shapes = sizes or ([()] + [(0,)] + [(rng.integers(1, 40),) if i % 2 else (rng.integers(1, 9), rng.integers(1, 9))
                                        for i in range(n - 2)])
    return {f"layers_{i}": {"w": jnp.asarray(rng.standard_normal(s).astype(dtype))} for i, s in enumerate(shapes)}


def _grads(params: dict, k: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(100 + k)
    return jax.tree.map(lambda p: jnp.asarray((scale * rng.standard_normal(p.shape)).astype(p.dtype)), params)


def _reference(params: dict, tx_kwargs: dict, hp: HyperParams, lr: float) -> ReferenceOptimizer:
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    layers = jax.tree.leaves(natural_layer_index(params, tx_kwargs.get("layer_index", "leaf")))
    return ReferenceOptimizer(leaves, [hp] * len(leaves), base_lr=lr, layer_index=layers, xp=np)


def _program(tx, params, *, direct: bool) -> str:
    def f(p, s, g):
        if direct:
            return step(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(f).lower(params, tx.init(params), params).as_text()


@needs_native
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("paradigm", ["scratch", "finetune", "none"])
def test_step_is_the_core_bit_for_bit(dtype, paradigm):
    """70 leaves (two calls), eager and jitted, 6 steps with a learning-rate schedule: ``step`` gives the core's
    params on numpy exactly; the update + apply round trip equals them to its one extra rounding."""
    params = _params(70, dtype)
    kwargs = dict(paradigm=paradigm, weight_decay=0.3, rollback_max=2.0, rollback_min=0.25, rollback_power=0.5)
    lrs = [0.05, 0.04, 0.03, 0.02, 0.01, 0.005]
    tx = dualopt(lambda count: jnp.asarray(lrs, jnp.float64)[count], **kwargs)
    assert _program(tx, params, direct=True).count("dualopt_xla_adam_params") == math.ceil(70 / native.CHUNK)
    hp = HyperParams(paradigm=paradigm, weight_decay=0.3, rollback_max=2.0, rollback_min=0.25, rollback_power=0.5)
    ref = _reference(params, kwargs, hp, lrs[0])
    eager, jitted, via_update = (params, tx.init(params)), (params, tx.init(params)), (params, tx.init(params))
    jstep = jax.jit(lambda p, s, g: step(tx, g, s, p))

    @jax.jit
    def jupdate(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for k, lr in enumerate(lrs):
        g = _grads(params, k)
        ref.step([np.asarray(x) for x in jax.tree.leaves(g)], lr)
        eager = step(tx, g, eager[1], eager[0])
        jitted = jstep(jitted[0], jitted[1], g)
        via_update = jupdate(via_update[0], via_update[1], g)
        for a, b, c, want, first in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted[0]),
                                        jax.tree.leaves(via_update[0]), ref.params, jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), want)
            np.testing.assert_array_equal(np.asarray(b), want)
            # params + (new - params): one more rounding per step, within the xla-jit class's budget
            # (spec/TOLERANCES.md: 4 eps x t of the tensor's scale)
            scale = max(np.abs(want).max(initial=0.0), np.abs(np.asarray(first)).max(initial=0.0))
            budget = 4 * (k + 1) * float(np.finfo(dtype).eps) * scale
            np.testing.assert_allclose(np.asarray(c), want, rtol=0, atol=budget)
    for m, want in zip(jax.tree.leaves(jitted[1].mu), ref.states):
        np.testing.assert_array_equal(np.asarray(m), want.exp_avg)
    assert tree_equal(eager[1], jitted[1])


@needs_native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormals_are_the_specs_not_flushed(dtype):
    """Gradients near the smallest normal make subnormal moments and steps: XLA:CPU flushes them to zero, the
    kernel computes them as IEEE arithmetic (and numpy, the spec) does."""
    tiny = float(np.finfo(dtype).tiny)
    params = {"w": jnp.asarray(np.full(5, 3 * tiny, dtype)),
              "b": jnp.asarray(np.linspace(-4, 4, 7).astype(dtype) * tiny)}
    grads = jax.tree.map(lambda p: p * 0.5, params)
    tx = dualopt(1e-3, paradigm="finetune", rollback_max=0.5, eps=tiny)
    hp = HyperParams(paradigm="finetune", rollback_max=0.5, eps=tiny)
    ref = _reference(params, {}, hp, 1e-3)
    p, s = params, tx.init(params)
    jstep = jax.jit(lambda p, s, g: step(tx, g, s, p))
    for _ in range(3):
        ref.step([np.asarray(x) for x in jax.tree.leaves(grads)], 1e-3)
        p, s = jstep(p, s, grads)
    assert any(0 < abs(float(x)) < tiny for m in jax.tree.leaves(s.mu) for x in np.ravel(m))  # subnormal moments
    for got, want in zip(jax.tree.leaves(p), ref.params):
        np.testing.assert_array_equal(np.asarray(got), want)
    for m, want in zip(jax.tree.leaves(s.mu), ref.states):
        np.testing.assert_array_equal(np.asarray(m), want.exp_avg)


@needs_native
def test_threaded_calls_and_large_leaves_stay_exact():
    """A call of many elements is shared out among XLA's threads; a leaf over NATIVE_MAX_SIZE takes XLA's
    operations (the program says so), within the xla-jit budget of the core."""
    sizes = [(40_000,)] * 3 + [(300, 300)] + [(7,)] * 3
    params = _params(len(sizes), np.float32, sizes=sizes)
    tx = dualopt(1e-2, paradigm="finetune", rollback_max=1.0, rollback_min=0.5)
    hlo = _program(tx, params, direct=True)
    assert hlo.count("dualopt_xla_adam_params") == 1  # one call: the six small leaves
    hp = HyperParams(paradigm="finetune", rollback_max=1.0, rollback_min=0.5)
    ref = _reference(params, {}, hp, 1e-2)
    p, s = params, tx.init(params)
    assert list(s.anchor) == ["layers_3"] and s.packed_anchor["float32"].shape == (3 * 40_000 + 3 * 7,)
    jstep = jax.jit(lambda p, s, g: step(tx, g, s, p))
    for k in range(3):
        g = _grads(params, k)
        ref.step([np.asarray(x) for x in jax.tree.leaves(g)], 1e-2)
        p, s = jstep(p, s, g)
    got = jax.tree.leaves(p)
    order = [path[0] for path in leaf_paths(params)]  # sorted keys: layers_0, layers_1, ..., layers_6
    for name, a, want in zip(order, got, ref.params):
        if name == "layers_3":
            np.testing.assert_allclose(np.asarray(a), want, rtol=0, atol=4 * 3 * np.finfo(np.float32).eps * 5)
        else:
            np.testing.assert_array_equal(np.asarray(a), want)


@needs_native
@pytest.mark.parametrize("where", ["kernel leaf in the second call", "an XLA leaf"])
def test_a_nonfinite_gradient_skips_every_leaf(where):
    """The check spans the kernel's leaves and XLA's (an SGD leaf here): one NaN anywhere skips the whole step,
    leaving params, moments and anchors bit for bit, and the XLA leaves see the same verdict."""
    params = _params(70, np.float64)
    direction = {name: "sgd" if name == "layers_5" else "adam" for name in params}
    tx = dualopt(1e-2, paradigm="finetune", rollback_max=1.0, direction=direction)
    jstep = jax.jit(lambda p, s, g: step(tx, g, s, p))
    p, s = jstep(params, tx.init(params), _grads(params, 0))
    bad = _grads(params, 1)
    name = "layers_69" if where.startswith("kernel") else "layers_5"
    bad[name]["w"] = bad[name]["w"].at[0].set(jnp.nan)
    p2, s2 = jstep(p, s, bad)
    assert tree_equal(p2, p) and tree_equal(s2._replace(skipped=s.skipped), s) and int(s2.skipped) == 1
    u, s3 = jax.jit(tx.update)(bad, s, p)
    assert all(np.all(np.asarray(x) == 0) and np.all(np.signbit(np.asarray(x))) for x in jax.tree.leaves(u) if x.size)
    assert tree_equal(s3, s2)


def test_which_leaves_take_the_kernel():
    """Small Adam leaves whose param, gradient and moments share float32/float64 take it; SGD leaves,
    bfloat16 params and leaves over NATIVE_MAX_SIZE keep XLA's operations."""
    from dualopt._optax_config import resolve_leaves
    from dualopt._optax_step import _native_leaves

    params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(3, jnp.float32), "c": jnp.ones(3, jnp.bfloat16),
              "d": jnp.ones(native.NATIVE_MAX_SIZE + 1, jnp.float32), "e": jnp.ones((2, 2), jnp.float64),
              "f": jnp.ones(native.NATIVE_MAX_SIZE, jnp.float32)}
    tx = dualopt(0.1, direction={"a": "adam", "b": "sgd", "c": "adam", "d": "adam", "e": "adam", "f": "adam"})
    state = tx.init(params)
    configs, _ = resolve_leaves(tx.init._dualopt_settings, params)
    flat = [jax.tree.leaves(t) for t in (params, params, state.mu, state.nu)]
    assert _native_leaves(configs, *flat) == [0, 4, 5]  # a, e, f
    grads = jax.tree.leaves(params)
    grads[0] = grads[0].astype(jnp.float64)  # a gradient of another dtype than its param
    assert _native_leaves(configs, flat[0], grads, flat[2], flat[3]) == [4, 5]


def test_lowered_for_another_platform_the_program_has_no_kernel():
    """A program lowered for a GPU (jax.export, cross-platform lowering) takes XLA's operations."""
    params = _params(6, np.float32)
    tx = dualopt(1e-2)

    def f(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    traced = jax.jit(f).trace(params, tx.init(params), params)
    assert "dualopt_xla" not in traced.lower(lowering_platforms=("cuda",)).as_text()
    if native.usable():
        assert "dualopt_xla" in traced.lower(lowering_platforms=("cpu",)).as_text()
    with native.disabled():
        assert "dualopt_xla" not in _program(tx, params, direct=False)


@needs_native
def test_grad_and_vmap_through_the_update_equal_xlas():
    """jax.grad through an update that calls the kernel uses the XLA step's derivative; jax.vmap maps the calls
    one member at a time. Both agree with the program traced without the kernels."""
    params = _params(5, np.float64)
    g = _grads(params, 0)

    def final_loss(lr_scale):
        tx = dualopt(lambda count: 0.1 * lr_scale, paradigm="finetune", rollback_max=0.5)
        p, s = params, tx.init(params)
        for _ in range(2):
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

    with_kernel = jax.jit(jax.grad(final_loss))(1.0)
    assert "dualopt_xla" in jax.jit(jax.grad(final_loss)).lower(1.0).as_text()
    with native.disabled():
        without = jax.jit(jax.grad(final_loss))(1.0)
    np.testing.assert_allclose(float(with_kernel), float(without), rtol=1e-12)

    tx = dualopt(0.1)
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)
    states = jax.vmap(tx.init)(batch)
    gs = jax.tree.map(lambda x: jnp.stack([x, -x]), g)
    got = jax.jit(jax.vmap(tx.update))(gs, states, batch)
    with native.disabled():
        want = jax.jit(jax.vmap(tx.update))(gs, states, batch)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)


def test_disabled_by_environment_in_a_fresh_process(tmp_path):
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, optax
        import dualopt._optax_native as n
        from dualopt.optax import dualopt
        p = {"w": jnp.ones(3)}
        tx = dualopt(0.1)
        text = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(p, tx.init(p), p).as_text()
        s = n.native_status()
        print(s["enabled"], "dualopt_xla" in text, s["reason"])
    """)
    env = dict(os.environ, DUALOPT_NATIVE="0", DUALOPT_NATIVE_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    enabled, called, *reason = out.stdout.split()
    assert enabled == "False" and called == "False" and "DUALOPT_NATIVE=0" in " ".join(reason)
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
def test_a_broken_compiler_falls_back(tmp_path):
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, optax
        import dualopt._optax_native as n
        from dualopt.optax import dualopt
        p = {"w": jnp.ones(3)}
        tx = dualopt(0.1)
        u, _ = jax.jit(lambda p, s, g: tx.update(g, s, p))(p, tx.init(p), p)
        print(n.native_status()["enabled"], float(u["w"][0]) < 0)
        print(n.native_status()["reason"])
    """)
    env = dict(os.environ, CC="false", DUALOPT_NATIVE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    first, reason = out.stdout.splitlines()[:2]
    assert first == "False True" and "false failed" in reason


def test_a_sharded_program_keeps_xlas_operations():
    """Several devices: the partitioner does not know the custom calls, so nothing calls them."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, optax
        import dualopt._optax_native as n
        from dualopt.optax import dualopt
        p = {"w": jnp.ones(3)}
        tx = dualopt(0.1)
        text = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(p, tx.init(p), p).as_text()
        print(len(jax.devices()), n.usable(), "dualopt_xla" in text)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["2", "False", "False"]
