"""DualOptState: abstract init, dtypes, shardings, checkpoint round trip, and the non-finite policy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from decoupled_core import HyperParams, ReferenceOptimizer

from tests.optax._optax_helpers import mlp_params, tree_equal

MIXED = dict(paradigm={"Dense_0": "finetune", "Dense_1": "finetune", "Dense_2": "scratch"},
             direction={"Dense_0": "adam", "Dense_1": "sgd", "Dense_2": "adam"},
             rollback_max=3.0, weight_decay=0.5, layer_index="module")


def _params(dtype=np.float64):
    import jax

    return jax.tree.map(jax.numpy.asarray, mlp_params(11, dtype=dtype))


def _grads(k, params, bad=None):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(k)
    out = [jnp.asarray(rng.standard_normal(p.shape), p.dtype) for p in leaves]
    if bad is not None:
        out[1] = out[1].at[(0,) * out[1].ndim].set(bad)
    return jax.tree.unflatten(treedef, out)


def _jit_step(tx, donate=False):
    import jax
    import optax

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def test_state_layout():
    """Every finetune leaf keeps its anchor, a copy of the param, in ``state.anchor`` nested by key path;
    scratch leaves have none; an SGD leaf's ``nu`` is an empty placeholder of its param's rank."""
    import jax

    from dualopt.optax import DualOptState, anchors, dualopt

    assert DualOptState._fields == ("count", "skipped", "mu", "nu", "anchor")
    for params in (_params(), _big_params()):
        tx = dualopt(1e-2, **MIXED)
        state = tx.init(params)
        assert isinstance(state, DualOptState)
        assert state.count.dtype == np.int32 and state.skipped.dtype == np.int32
        assert state.mu["Dense_0"]["kernel"].shape == params["Dense_0"]["kernel"].shape
        assert state.nu["Dense_1"]["kernel"].shape == (0, 0)  # SGD leaf: no second moment
        assert state.nu["Dense_1"]["bias"].shape == (0,)
        assert sorted(state.anchor) == ["Dense_0", "Dense_1"] and sorted(state.anchor["Dense_1"]) == ["bias", "kernel"]
        for m in ("Dense_0", "Dense_1"):
            for n in ("bias", "kernel"):
                np.testing.assert_array_equal(state.anchor[m][n], params[m][n])
                assert state.anchor[m][n] is not params[m][n]  # a copy, not the params' buffer
        got = anchors(tx, state, params)  # the scratch Dense_2 has no anchor
        assert jax.tree.structure(got) == jax.tree.structure(state.anchor)
        assert all(a is b for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.anchor)))
        assert len(jax.tree.leaves(state)) == 2 + 6 + 6 + 4


def _big_params():
    """Dense_0 and Dense_1 kernels of 67600 elements, the biases small."""
    import jax

    return jax.tree.map(jax.numpy.asarray, mlp_params(3, sizes=(260, 260, 260, 3)))


def test_anchors_are_matched_by_path_nested_or_flat():
    """A restore without a template that keys the anchors flat by path string (``"Dense_0/kernel"``) steps
    exactly like the nested layout ``init`` makes; a missing, extra or misshaped anchor is refused by name."""
    import jax

    from decoupled_core import HyperparameterError
    from dualopt.optax import dualopt, path_str

    params = _big_params()
    tx = dualopt(1e-2, **MIXED)
    state = tx.init(params)
    flat = {path_str(tuple(getattr(e, "key") for e in kp)): x
            for kp, x in jax.tree_util.tree_flatten_with_path(state.anchor)[0]}
    assert sorted(flat) == ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
    g = _grads(0, params)
    want, _ = tx.update(g, state, params)
    got, new = tx.update(g, state._replace(anchor=flat), params)
    assert tree_equal(got, want) and new.anchor is flat  # passed through as given
    bad = {
        "without": ({k: v for k, v in flat.items() if k != "Dense_1/kernel"},
                    """state.anchor="<pytree without the finetune param 'Dense_1/kernel'>" is invalid"""),
        "extra": ({**flat, "Dense_2/kernel": flat["Dense_1/kernel"]},
                  "<pytree with the leaf 'Dense_2/kernel', not a finetune param of these params>"),
        "shape": ({**flat, "Dense_1/kernel": flat["Dense_1/kernel"][:1]}, "state.anchor['Dense_1/kernel']="),
        "type": ([flat[k] for k in sorted(flat)], "state.anchor='<list>' is invalid: expected a dict of the finetune anchors"),
    }
    for name, (anchor, message) in bad.items():
        with pytest.raises(HyperparameterError) as info:
            tx.update(g, state._replace(anchor=anchor), params)
        assert message in str(info.value), (name, str(info.value))


def test_state_of_the_packed_layout_is_refused_with_how_to_migrate():
    """A state of the earlier layout (a sixth field ``packed_anchor`` holding the small finetune anchors) is
    refused by name with how to migrate, eagerly and under jit; restored into today's fields without it, the
    missing anchors are named. Before, the packed layout was today's and no such check existed."""
    from collections import namedtuple

    import jax

    from decoupled_core import HyperparameterError
    from dualopt.optax import dualopt

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    state = tx.init(params)
    Old = namedtuple("DualOptState", ("count", "skipped", "mu", "nu", "anchor", "packed_anchor"))
    old = Old(state.count, state.skipped, state.mu, state.nu, {}, {"float64": jax.numpy.zeros(40)})
    g = _grads(0, params)
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(HyperparameterError) as info:
            update(g, old, params)
        msg = str(info.value)
        assert msg.startswith("state.packed_anchor='<present>' is invalid: expected a DualOptState with the fields "
                              "('count', 'skipped', 'mu', 'nu', 'anchor')"), msg
        assert "take dualopt.optax.anchors(tx, state, params) as the new 'anchor' field" in msg, msg
    with pytest.raises(HyperparameterError, match="without the finetune param 'Dense_0/bias'.*'packed_anchor'"):
        tx.update(g, state._replace(anchor={}), params)


def test_two_finetune_leaves_with_one_path_string_are_refused():
    import jax.numpy as jnp

    from decoupled_core import HyperparameterError
    from dualopt.optax import anchors, dualopt

    params = {"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    with pytest.raises(HyperparameterError, match="two finetune leaves at 'a/b'"):
        dualopt(0.1, paradigm="finetune").init(params)
    tx = dualopt(0.1, paradigm={"a/b": "finetune", "a": "scratch"})
    state = tx.init(params)  # one anchor: no clash
    assert list(anchors(tx, state, params)) == ["a/b"]


def test_init_accepts_abstract_params():
    import jax

    from dualopt.optax import dualopt

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    real = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(shapes), jax.tree.leaves(real)):
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
    # and a whole jitted update traced on abstract values
    out = jax.eval_shape(_jit_step(tx), abstract, shapes, abstract)
    assert jax.tree.structure(out[1]) == jax.tree.structure(real)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_and_low_precision_match_core(dtype):
    """float32 stays float32 (even with x64 on); bf16/f16 params keep their dtype with float32 moments
    and anchors, and equal the core's reference (on jax.numpy) bit for bit when run eagerly."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt, leaf_paths, natural_layer_index, step

    dt = jnp.dtype(dtype)
    params = jax.tree.map(lambda p: p.astype(dt), _params())
    tx = dualopt(1e-2, **MIXED)
    state = tx.init(params)
    compute = jnp.float32
    for leaf in jax.tree.leaves((state.mu, state.nu, state.anchor)):
        assert leaf.dtype == compute
    jstep = _jit_step(tx)
    p, s = params, state
    for k in range(3):
        p, s = jstep(p, s, _grads(k, params))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
        assert a.dtype == dt
        assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for leaf in jax.tree.leaves((s.mu, s.nu, s.anchor)):
        assert leaf.dtype == compute

    paths = leaf_paths(params)
    hps = [HyperParams(direction=MIXED["direction"][q[0]], paradigm=MIXED["paradigm"][q[0]], rollback_max=3.0,
                       weight_decay=0.5) for q in paths]
    ref = ReferenceOptimizer(jax.tree.leaves(params), hps, base_lr=1e-2,
                             layer_index=jax.tree.leaves(natural_layer_index(params)), xp=jnp)
    p, s = params, state
    for k in range(3):
        g = _grads(k, params)
        p, s = step(tx, g, s, p)
        ref.step(jax.tree.leaves(g), 1e-2)
    for a, b in zip(jax.tree.leaves(p), ref.params):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_nonfinite_skip_keeps_every_bit():
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    jstep = _jit_step(tx)
    p, s = jstep(params, tx.init(params), _grads(0, params))
    p["Dense_0"]["bias"] = p["Dense_0"]["bias"].at[0].set(-0.0)  # -0.0 + (+0.0) would give +0.0
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        p2, s2 = jstep(p, s, _grads(1, params, bad=bad))
        assert tree_equal(p2, p)
        assert tree_equal(s2._replace(skipped=s.skipped), s)
        assert int(s2.skipped) == int(s.skipped) + 1
        p, s = p2, s2
    assert int(s.count) == 1 and int(s.skipped) == 3
    assert np.signbit(np.asarray(p["Dense_0"]["bias"])[0])


def test_nonfinite_propagate_lets_nan_through():
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    params = _params()
    tx = dualopt(1e-2, nonfinite="propagate", **MIXED)
    p, s = _jit_step(tx)(params, tx.init(params), _grads(1, params, bad=jnp.nan))
    leaves = jax.tree.leaves(p)
    assert np.isnan(np.asarray(leaves[1])).any()
    assert not np.isnan(np.asarray(leaves[0])).any()
    assert int(s.count) == 1 and int(s.skipped) == 0


def test_checkpoint_roundtrip_resumes_bitwise(tmp_path):
    """flatten -> np.savez -> np.load -> unflatten (structure from jax.eval_shape of init): resuming
    gives the same bits as never stopping."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    params = _params()
    tx = dualopt(1e-2, **MIXED)
    jstep = _jit_step(tx, donate=True)
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for k in range(4):
        p, s = jstep(p, s, _grads(k, params))
    leaves = jax.tree.leaves((p, s))
    np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
    for k in range(4, 8):
        p, s = jstep(p, s, _grads(k, params))
    uninterrupted = (p, s)

    template = jax.eval_shape(lambda q: (q, tx.init(q)), params)
    with np.load(tmp_path / "ckpt.npz") as z:
        loaded = [z[f"arr_{i}"] for i in range(len(z.files))]
    for x, t in zip(loaded, jax.tree.leaves(template)):
        assert (x.shape, x.dtype) == (t.shape, t.dtype)
    p, s = jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(x) for x in loaded])
    for k in range(4, 8):
        p, s = jstep(p, s, _grads(k, params))
    assert tree_equal((p, s), uninterrupted)


def test_shardings_are_kept():
    """On a 2-device CPU mesh (a subprocess: the device count is fixed at jax start-up), init and a
    jitted update keep every param's sharding on its moments and anchor."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from dualopt.optax import dualopt
        mesh = jax.make_mesh((2,), ("x",))
        rows = NamedSharding(mesh, P("x", None))
        rep = NamedSharding(mesh, P())
        params = {"Dense_0": {"kernel": jax.device_put(jnp.ones((4, 6)), rows),
                              "bias": jax.device_put(jnp.zeros(6), rep)},
                  "Dense_1": {"kernel": jax.device_put(jnp.ones((6, 2)), rows),
                              "bias": jax.device_put(jnp.ones(2), rep)},
                  "Dense_2": {"kernel": jax.device_put(jnp.ones((400, 200)), rows)}}
        tx = dualopt(1e-2, paradigm={"Dense_0": "finetune", "Dense_1": "scratch", "Dense_2": "finetune"},
                     layer_index="module")
        state = tx.init(params)
        def same(a, b):
            return a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for tree in (state.mu, state.nu):
            assert all(jax.tree.leaves(jax.tree.map(same, tree, params))), tree
        for m in ("Dense_0", "Dense_2"):  # finetune: every anchor sharded like its param
            assert all(jax.tree.leaves(jax.tree.map(same, state.anchor[m], params[m]))), m
        assert "Dense_1" not in state.anchor
        abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
        shapes = jax.eval_shape(tx.init, abstract)
        assert shapes.mu["Dense_0"]["kernel"].sharding.spec == P("x", None), shapes.mu["Dense_0"]["kernel"].sharding
        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        p, s = step(params, state, jax.tree.map(jnp.ones_like, params))
        assert all(jax.tree.leaves(jax.tree.map(same, p, params)))
        assert all(jax.tree.leaves(jax.tree.map(same, s.mu, params)))
        assert all(jax.tree.leaves(jax.tree.map(same, s.anchor["Dense_0"], params["Dense_0"])))
        assert same(s.anchor["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
        print("OK", len(jax.devices()))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 2" in out.stdout


def test_init_directly_on_shape_dtype_structs():
    """Like optax.adam, ``tx.init`` on ``jax.ShapeDtypeStruct`` leaves returns real zero moments; finetune
    leaves need values for their anchors: a clear error, unless the anchors are passed explicitly."""
    import jax
    import jax.numpy as jnp

    from decoupled_core import HyperparameterError
    from dualopt.optax import anchors, dualopt

    params = _params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    scratch = dualopt(1e-2, paradigm="scratch").init(abstract)
    assert tree_equal(scratch, dualopt(1e-2, paradigm="scratch").init(params))
    with pytest.raises(HyperparameterError, match=r"params=\"<jax.ShapeDtypeStruct at 'Dense_0/bias'>\" is invalid: "
                                                  r"expected arrays for finetune leaves"):
        dualopt(1e-2, **MIXED).init(abstract)
    explicit = jax.tree.map(lambda p: p + 1.0, params)
    tx = dualopt(1e-2, anchor=explicit, **MIXED)
    given = tx.init(abstract)
    np.testing.assert_array_equal(anchors(tx, given, params)["Dense_1"]["kernel"], explicit["Dense_1"]["kernel"])
    assert "Dense_2" not in anchors(tx, given, params)
    assert isinstance(given.mu["Dense_0"]["kernel"], jax.Array)
    np.testing.assert_array_equal(given.mu["Dense_0"]["kernel"], jnp.zeros_like(params["Dense_0"]["kernel"]))


def test_float32_stays_float32_without_x64():
    """x64 off (as most users run), a float32 schedule: params, updates and state stay float32, counts int32,
    and a step equals the core's reference on jax.numpy within the float32 "xla-jit" budget."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt, leaf_paths, natural_layer_index

    with jax.enable_x64(False):
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), mlp_params(5, dtype=np.float32))
        schedule = optax.linear_schedule(2e-2, 1e-2, 10)
        tx = dualopt(schedule, **MIXED)
        state = tx.init(params)
        jstep = _jit_step(tx)
        p, s = params, state
        for k in range(5):
            g = _grads(k, params)
            u, _ = jax.jit(tx.update)(g, s, p)
            assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
            p, s = jstep(p, s, g)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((p, s.mu, s.nu, s.anchor)))
        assert s.count.dtype == jnp.int32 and s.skipped.dtype == jnp.int32 and int(s.count) == 5

        paths = leaf_paths(params)
        hps = [HyperParams(direction=MIXED["direction"][q[0]], paradigm=MIXED["paradigm"][q[0]], rollback_max=3.0,
                           weight_decay=0.5) for q in paths]
        ref = ReferenceOptimizer([np.asarray(x) for x in jax.tree.leaves(params)], hps, base_lr=float(schedule(0)),
                                 layer_index=jax.tree.leaves(natural_layer_index(params)))
        for k in range(5):
            ref.step([np.asarray(x) for x in jax.tree.leaves(_grads(k, params))], float(schedule(k)))
        scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(params))
        gap = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(p), ref.params))
        assert gap <= 4 * np.finfo(np.float32).eps * 5 * scale, gap


def _keyed(tree, prefix):
    """An orbax-style flat checkpoint: ``{"prefix/key/path": numpy array}``."""
    import jax

    from dualopt.optax import path_str

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e))) for e in path)
        out[f"{prefix}/{path_str(keys)}"] = np.asarray(leaf)
    return out


def test_pytree_checkpoint_of_a_composite_state_resumes_bitwise(tmp_path):
    """``chain(clip_by_global_norm, inject_hyperparams(dualopt))`` with a learning-rate change at run time:
    the whole optimizer state (nested NamedTuples, a dict of hyperparameters) goes to an ``.npz`` under its
    key paths and is restored *into the template* of a freshly built transform
    (``jax.eval_shape(tx.init, ...)``), as orbax's restore-into-target does; the resumed run (a new jitted
    step) ends bit for bit where the uninterrupted one does."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    def make():
        inner = optax.inject_hyperparams(dualopt, static_args=("paradigm", "direction"))
        return optax.chain(optax.clip_by_global_norm(2.0), inner(learning_rate=1e-2, **MIXED))

    params = _params()
    grads = [_grads(k, params) for k in range(8)]

    def run(tx, p, s, start, stop):
        step = _jit_step(tx, donate=True)
        for k in range(start, stop):
            if k == 2:
                s[1].hyperparams["learning_rate"] = jnp.asarray(3e-3, s[1].hyperparams["learning_rate"].dtype)
            p, s = step(p, s, grads[k])
        return p, s

    tx = make()
    p, s = run(tx, jax.tree.map(jnp.copy, params), tx.init(params), 0, 5)
    np.savez(tmp_path / "ckpt.npz", **_keyed(p, "params"), **_keyed(s, "state"))
    uninterrupted = run(tx, p, s, 5, 8)

    tx = make()
    template = jax.eval_shape(lambda q: (q, tx.init(q)), params)
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as z:
        saved = {k: z[k] for k in z.files}
    names = list(_keyed(jax.tree.map(lambda _: np.zeros(()), template[0]), "params")) + \
        list(_keyed(jax.tree.map(lambda _: np.zeros(()), template[1]), "state"))
    assert sorted(names) == sorted(saved)
    leaves = [jnp.asarray(saved[k]) for k in names]
    for x, t in zip(leaves, jax.tree.leaves(template)):
        assert (x.shape, x.dtype) == (t.shape, t.dtype)
    p, s = jax.tree.unflatten(jax.tree.structure(template), leaves)
    assert float(s[1].hyperparams["learning_rate"]) == np.float64(3e-3)
    resumed = run(tx, p, s, 5, 8)
    assert tree_equal(resumed, uninterrupted)
    assert int(resumed[1][1].inner_state.count) == 8
