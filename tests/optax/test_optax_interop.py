"""DualOpt's state with Optax's and JAX's own tools, and inputs the spec refuses (issue 19, Optax items).

- ``optax.tree_map_params`` calls ``init`` with a leafless stand-in for the params and maps ``f`` over
  every state field that mirrors it: finetune anchors (not params-shaped) must not break it (O2).
- ``jax.make_mesh`` gives Explicit axes in jax 0.10: a finetune ``init`` on such params (O3), and an SGD
  state given the params' shardings by ``tree_map_params`` and placed by ``jax.device_put`` (O4), run in a
  subprocess with 4 CPU devices (the device count is fixed at JAX start-up).
- Complex and integer params are refused at ``init`` (spec section 7; O1/R8), a negative count in a state
  at ``update`` (R7).
- No home directory: nothing of the Optax adapter reads ``Path.home()`` or a cache (issue 16, item 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.optax._optax_helpers import mlp_params, tree_equal

MIXED = dict(paradigm={"Dense_0": "finetune", "Dense_1": "finetune", "Dense_2": "scratch"},
             direction={"Dense_0": "adam", "Dense_1": "sgd", "Dense_2": "adam"},
             rollback_max=3.0, weight_decay=0.5, layer_index="module")


def _params():
    import jax

    return jax.tree.map(jax.numpy.asarray, mlp_params(11, dtype=np.float64))


def _run(code: str, devices: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    base = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env if env is not None else base, timeout=300)


@pytest.mark.parametrize("chained", [False, True], ids=["dualopt", "chain"])
@pytest.mark.parametrize("per_key", [False, True], ids=["one-paradigm", "per-key"])
def test_tree_map_params_maps_the_moments_and_hands_the_anchors_to_transform_non_params(chained, per_key):
    """O2: on today's main the stand-in's ``anchor`` was ``{}`` and the real one not, and tree_map_params
    raised a structure mismatch; with per-key settings (a prefix pytree) ``init`` of the stand-in raised
    first."""
    import optax

    from dualopt.optax import dualopt

    params = _params()
    settings = MIXED if per_key else dict(paradigm="finetune", direction="adam")
    inner = dualopt(1e-2, **settings)
    tx = optax.chain(optax.clip_by_global_norm(1.0), inner) if chained else inner
    state = tx.init(params)
    seen = []
    mapped = optax.tree_map_params(tx, lambda x, p: (x.shape, p.shape), state, params,
                                   transform_non_params=lambda x: seen.append(x) or "other")
    dual = mapped[1] if chained else mapped
    original = state[1] if chained else state
    assert dual.mu["Dense_0"]["kernel"] == (params["Dense_0"]["kernel"].shape,) * 2
    if per_key:  # Dense_1 is SGD: an empty placeholder of the param's rank
        assert dual.nu["Dense_1"]["kernel"] == ((0, 0), params["Dense_1"]["kernel"].shape)
    assert dual.anchor == "other" and dual.count == "other"
    assert any(x is original.anchor for x in seen)
    # and the identity map gives the state back
    same = optax.tree_map_params(tx, lambda x: x, state)
    assert tree_equal(same, state)


def test_a_leafless_custom_node_as_params_round_trips():
    """The stand-in ``init`` gives a leafless custom node (what ``tree_map_params`` passes) is a valid state
    for such params: ``update`` accepts it and returns nothing to update."""
    import jax

    from dualopt.optax import dualopt

    class Empty:
        pass

    jax.tree_util.register_pytree_node(Empty, lambda e: ((), None), lambda aux, children: Empty())
    tx = dualopt(1e-2, paradigm="finetune")
    params = Empty()
    state = tx.init(params)
    assert repr(state.anchor) == "<the finetune anchors>" and jax.tree.leaves(state.anchor) == [state.anchor]
    updates, new = tx.update(params, state, params)
    assert isinstance(updates, Empty) and int(new.count) == 1


_MESH = """
    import math
    import jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dualopt.optax import dualopt
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    assert all(str(t).endswith("Explicit") for t in mesh.axis_types), mesh.axis_types
    spec = {"Dense_0": {"kernel": P("x", "y"), "bias": P("y")}, "Dense_1": {"kernel": P(None, "x"), "bias": P()},
            "head": {"kernel": P("y", None), "bias": P()}}
    sh = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P))
    shapes = {"Dense_0": {"kernel": (4, 8), "bias": (8,)}, "Dense_1": {"kernel": (8, 4), "bias": (4,)},
              "head": {"kernel": (4, 2), "bias": (2,)}}
    params = jax.tree.map(lambda s, d: jax.device_put(jnp.linspace(-1.0, 1.0, math.prod(s)).reshape(s), d),
                          shapes, sh, is_leaf=lambda s: isinstance(s, tuple))
    same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim)
    grads = jax.tree.map(lambda p: p * 0.5, params)
"""


def test_finetune_init_on_explicitly_sharded_params():
    """O3: a finetune ``init`` on params sharded with Explicit axes (``jax.make_mesh``'s default) raised
    ``ShardingTypeError`` on today's main (the reshape of the anchor packing); now every anchor is sharded
    like its param and a jitted update keeps the shardings."""
    code = _MESH + """
    with jax.set_mesh(mesh):
        tx = dualopt(1e-2, paradigm={"Dense_0": "finetune", "Dense_1": "finetune", "head": "scratch"})
        state = tx.init(params)
        assert all(jax.tree.leaves(jax.tree.map(same, state.anchor, {k: params[k] for k in ("Dense_0", "Dense_1")})))
        assert all(jax.tree.leaves(jax.tree.map(same, state.mu, params)))
        u, s = jax.jit(lambda p, s, g: tx.update(g, s, p))(params, state, grads)
        assert all(jax.tree.leaves(jax.tree.map(same, u, params))) and int(s.count) == 1
        assert all(jax.tree.leaves(jax.tree.map(same, s.anchor, state.anchor)))
        print("OK", len(jax.devices()))
    """
    out = _run(code, devices=4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


def test_sgd_state_takes_the_params_shardings_from_tree_map_params():
    """O4: an SGD state's ``nu`` placeholders were shape ``(0,)`` in a params-shaped tree, so the params' 2-D
    shardings given by ``tree_map_params`` made ``jax.device_put`` fail on today's main; now a placeholder
    has its param's rank (every axis of size 0 divides the mesh) and the placed state steps."""
    code = _MESH + """
    with jax.set_mesh(mesh):
        tx = dualopt(1e-2, direction="sgd", paradigm="scratch")
        state = tx.init(params)
        rep = NamedSharding(mesh, P())
        shardings = optax.tree_map_params(tx, lambda _, s: s, state, sh, transform_non_params=lambda _: rep)
        placed = jax.device_put(state, shardings)
        assert placed.nu["Dense_0"]["kernel"].shape == (0, 0)
        assert placed.mu["Dense_0"]["kernel"].sharding.spec == P("x", "y")
        u, s = jax.jit(lambda p, s, g: tx.update(g, s, p))(params, placed, grads)
        assert int(s.count) == 1 and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        print("OK", len(jax.devices()))
    """
    out = _run(code, devices=4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "int32", "bool"])
def test_complex_and_integer_params_are_refused_at_init(dtype):
    """O1/R8: on today's main a complex leaf was accepted (nu = g*g then goes negative and moves the real
    part of the weight); spec section 7 refuses complex and integer tensors."""
    import jax.numpy as jnp

    from decoupled_core import HyperparameterError
    from dualopt.optax import dualopt

    params = {"a": jnp.ones(3), "b": {"w": jnp.ones((2, 2), dtype)}}
    for paradigm in ("scratch", "finetune"):
        tx = dualopt(0.1, paradigm=paradigm)
        with pytest.raises(HyperparameterError) as info:
            tx.init(params)
        assert str(info.value) == (
            f"params['b/w']='<{dtype} array>' is invalid: expected a real floating-point array (float16, bfloat16, "
            "float32 or float64): complex and integer params are out of scope (spec section 7).")
    # update refuses them too, with a state made for real params of the same shapes
    tx = dualopt(0.1)
    real = {"a": jnp.ones(3), "b": {"w": jnp.ones((2, 2))}}
    with pytest.raises(HyperparameterError, match=rf"params\['b/w'\]='<{dtype} array>' is invalid"):
        tx.update(params, tx.init(real), params)


@pytest.mark.parametrize("field", ["count", "skipped"])
def test_negative_count_is_refused(field):
    """R7: on today's main a state with ``count = -3`` was accepted and the next finite step made every
    weight NaN or Inf (t = count + 1 <= 0 makes a bias correction zero or negative)."""
    import jax.numpy as jnp

    from decoupled_core import HyperparameterError
    from dualopt.optax import anchors, dualopt, step

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    state = tx.init(params)
    bad = state._replace(**{field: jnp.asarray(-3, jnp.int32)})
    grads = params
    for call in (lambda: tx.update(grads, bad, params), lambda: step(tx, grads, bad, params),
                 lambda: anchors(tx, bad, params)):
        with pytest.raises(HyperparameterError) as info:
            call()
        assert str(info.value).startswith(f"state.{field}=-3 is invalid: expected a count >= 0"), str(info.value)
    assert int(tx.update(grads, state, params)[1].count) == 1  # the valid state still works


@pytest.mark.parametrize("chained", [False, True], ids=["dualopt", "chain"])
def test_check_state_reads_the_values_a_jitted_update_cannot(chained):
    """Issue 20 (left from 19): ``dualopt.optax.check_state`` refuses, eagerly and naming the leaf, what a
    restored state may hold and a compiled update cannot read: a negative count, non-finite moments or
    anchors, a negative second moment; it raises like ``update`` on a layout mismatch, and refuses to run on
    traced values. It did not exist before."""
    import jax
    import jax.numpy as jnp
    import optax

    from decoupled_core import HyperparameterError
    from dualopt.optax import check_state, dualopt

    params = _params()
    inner = dualopt(1e-2, **MIXED)
    tx = optax.chain(optax.clip(1.0), inner) if chained else inner
    full = tx.init(params)
    state = full[1] if chained else full
    wrap = (lambda s: (full[0], s)) if chained else (lambda s: s)
    assert check_state(tx, full, params) is None
    poison = lambda tree, key, value: {**tree, "Dense_0": {**tree["Dense_0"], key: value}}  # noqa: E731
    k = state.mu["Dense_0"]["kernel"]
    assert k.shape == (6, 8)
    bad = {
        "state.count=-1 is invalid: expected a count >= 0": state._replace(count=jnp.asarray(-1, jnp.int32)),
        "state.skipped=-2 is invalid": state._replace(skipped=jnp.asarray(-2, jnp.int32)),
        "state.mu['Dense_0/kernel']='<array with 1 non-finite values>' is invalid: expected finite values":
            state._replace(mu=poison(state.mu, "kernel", k.at[0, 0].set(jnp.nan))),
        "state.nu['Dense_0/kernel']='<array with negative values>' is invalid":
            state._replace(nu=poison(state.nu, "kernel", k.at[1, 0].set(-1e-30))),
        "state.anchor['Dense_0/kernel']='<array with 8 non-finite values>'":
            state._replace(anchor=poison(state.anchor, "kernel", k.at[0].set(jnp.inf))),
        "state.mu['Dense_0/kernel']='<array of shape (3,) and dtype float64>' is invalid":
            state._replace(mu=poison(state.mu, "kernel", jnp.zeros(3))),
    }
    for message, s in bad.items():
        with pytest.raises(HyperparameterError) as info:
            check_state(tx, wrap(s), params)
        assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(HyperparameterError, match="call it outside jax.jit"):
        jax.jit(lambda s: check_state(tx, s, params))(full)


@pytest.mark.parametrize("direct", [False, True], ids=["update", "step"])
def test_negative_count_under_jit_is_skipped_and_counted(direct):
    """Issue 20 (left from 19): under ``jax.jit`` the count is traced, so ``nonfinite="skip"`` treats a negative
    one like a non-finite gradient: params, moments and count keep every bit and ``skipped`` grows by one. On
    the code before, the jitted update advanced with t = count + 1 <= 0 and made every Adam weight NaN."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt, step

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    state = tx.update(grads, state, params)[1]  # non-zero moments
    bad = state._replace(count=jnp.asarray(-3, jnp.int32), skipped=jnp.asarray(5, jnp.int32))

    def run(p, s, g):
        if direct:
            return step(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    new_params, new = jax.jit(run)(params, bad, grads)
    assert tree_equal(new_params, params) and tree_equal(new.mu, bad.mu) and tree_equal(new.nu, bad.nu)
    assert int(new.count) == -3 and int(new.skipped) == 6
    ok_params, ok = jax.jit(run)(params, state, grads)  # the same step from a valid count advances
    assert int(ok.count) == 2 and int(ok.skipped) == 0 and not tree_equal(ok_params, params)


def test_no_home_directory_and_no_cache():
    """Issue 16, item 3 (optax half): with ``HOME`` unset and ``Path.home`` raising (a uid without a passwd
    entry, as in containers), an optax update works, eagerly and jitted, and nothing native is imported.
    On today's main the jitted update built the C kernel, whose cache lookup called ``Path.home()`` and
    raised ``RuntimeError("Could not determine home directory.")``."""
    code = """
        import pathlib, sys
        def no_home(*args, **kwargs):
            raise RuntimeError("Could not determine home directory.")
        pathlib.Path.home = classmethod(no_home)
        import jax, jax.numpy as jnp, optax
        from dualopt.optax import dualopt
        params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
        tx = dualopt(1e-2, paradigm={"Dense_0": "finetune", "head": "scratch"})
        state = tx.init(params)
        grads = jax.tree.map(lambda p: p + 0.5, params)
        eager = tx.update(grads, state, params)
        jitted = jax.jit(lambda p, s, g: tx.update(g, s, p))(params, state, grads)
        assert int(jitted[1].count) == 1 and int(eager[1].count) == 1
        native = sorted(m for m in sys.modules if m.startswith("dualopt._") and "native" in m)
        assert not native, native
        print("OK")
    """
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "DUALOPT_NATIVE",
                                                            "DUALOPT_NATIVE_CACHE")}
    env.update(JAX_PLATFORMS="cpu")
    out = _run(code, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
