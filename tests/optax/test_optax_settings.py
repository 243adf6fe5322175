"""Per-leaf settings of dualopt.optax: every rate and layer_index as a single value, a prefix pytree or a
function of the key path, checked on the rates and on the updates; natural layer order on Flax/Haiku/list
layouts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.optax._optax_helpers import tree_equal


def _model():
    import jax.numpy as jnp

    layer = lambda n: {"kernel": jnp.full((2, 3), float(n)), "bias": jnp.full(3, 0.1 * n)}  # noqa: E731
    return {"backbone": {f"layers_{i}": layer(i + 1) for i in (0, 1, 2, 10)}, "head": layer(7)}


FINETUNE = {"backbone": "finetune", "head": "scratch"}


@pytest.mark.parametrize("name,one,other", [
    ("rollback_max", 4.0, 2.0), ("rollback_min", 0.5, 1.0), ("rollback_power", 2.0, 0.5)])
def test_rollback_rates_as_value_pytree_and_function(name, one, other):
    """layers_1 gets ``other``, the rest ``one``: as a prefix pytree and as a function of the path, the
    rates equal the core's schedule for the leaf's own value, and the three spellings give the same
    updates."""
    import jax

    from decoupled_core import HyperParams, finetune_rate
    from dualopt.optax import dualopt, layer_rates

    params = _model()
    base = dict(rollback_max=4.0, rollback_min=0.5, rollback_power=2.0)
    pytree = {"backbone": {k: (other if k == "layers_1" else one) for k in params["backbone"]}, "head": one}
    fn = lambda path: other if path[:2] == ("backbone", "layers_1") else one  # noqa: E731
    txs = [dualopt(0.1, paradigm=FINETUNE, layer_index="module", **{**base, name: v}) for v in (pytree, fn)]
    rates = [layer_rates(tx, params) for tx in txs]
    assert rates[0] == rates[1]
    order = ["layers_0", "layers_1", "layers_2", "layers_10"]  # natural order: l = 0..3, L = 4
    for l, layer in enumerate(order):
        hp = HyperParams(paradigm="finetune", **{**base, name: other if layer == "layers_1" else one})
        want = finetune_rate(l, 4, hp.rollback_max, hp.rollback_min, hp.rollback_power)
        assert rates[0][f"backbone/{layer}/kernel"] == rates[0][f"backbone/{layer}/bias"] == want
    assert rates[0]["head/kernel"] == 1e-2  # the scratch head: weight_decay * (0 + 1) / 1
    grads = jax.tree.map(lambda p: 0.3 * p - 0.1, params)
    updates = [tx.update(grads, tx.init(params), params)[0] for tx in txs]
    assert tree_equal(updates[0], updates[1])
    single = dualopt(0.1, paradigm=FINETUNE, layer_index="module", **{**base, name: one})
    assert layer_rates(single, params)["backbone/layers_1/kernel"] != rates[0]["backbone/layers_1/kernel"]


def test_weight_decay_as_value_pytree_and_function():
    from dualopt.optax import dualopt, layer_rates

    params = _model()
    single = layer_rates(dualopt(0.1, weight_decay=0.4, layer_index="module"), params)
    # scratch everywhere, 5 modules in natural order: backbone/layers_0,1,2,10, head
    assert [single[f"backbone/layers_{i}/kernel"] for i in (0, 1, 2, 10)] == [0.4 * (k / 5) for k in (1, 2, 3, 4)]  # the spec: lambda * ((l + 1) / L)
    assert single["head/bias"] == 0.4
    tree = layer_rates(dualopt(0.1, weight_decay={"backbone": 0.4, "head": 1.0}, layer_index="module"), params)
    fn = layer_rates(dualopt(0.1, weight_decay=lambda p: 1.0 if p[0] == "head" else 0.4, layer_index="module"),
                     params)
    assert tree == fn
    assert tree["head/kernel"] == 1.0 and tree["backbone/layers_10/bias"] == single["backbone/layers_10/bias"]


def test_direction_and_adam_settings_per_leaf_equal_separate_transforms():
    """b1, eps and direction per subtree (paradigm "none", so that no numbering is shared): the update of
    each subtree is the one a transform with that subtree's single values computes on it, bit for bit."""
    import jax

    from dualopt.optax import dualopt

    params = _model()
    grads = jax.tree.map(lambda p: 0.2 * p + 0.05, params)
    tx = dualopt(0.1, paradigm="none", direction={"backbone": "adam", "head": "sgd"},
                 b1=lambda p: 0.5 if p[:2] == ("backbone", "layers_1") else 0.9, eps={"backbone": 1e-3, "head": 1e-8},
                 momentum=0.7)
    updates, _ = tx.update(grads, tx.init(params), params)
    for sub, kw in (("layers_0", dict(b1=0.9, eps=1e-3)), ("layers_1", dict(b1=0.5, eps=1e-3))):
        p, g = params["backbone"][sub], grads["backbone"][sub]
        one = dualopt(0.1, paradigm="none", **kw)
        assert tree_equal(one.update(g, one.init(p), p)[0], updates["backbone"][sub])
    sgd = dualopt(0.1, paradigm="none", direction="sgd", momentum=0.7)
    assert tree_equal(sgd.update(grads["head"], sgd.init(params["head"]), params["head"])[0], updates["head"])


def test_layer_index_single_int_puts_every_leaf_in_one_layer():
    from dualopt.optax import dualopt, layer_rates

    params = _model()
    rates = layer_rates(dualopt(0.1, paradigm=FINETUNE, rollback_max=2.0, weight_decay=0.3, layer_index=3), params)
    assert {r for k, r in rates.items() if k.startswith("backbone")} == {2.0}  # L = 1: rollback_max
    assert {r for k, r in rates.items() if k.startswith("head")} == {0.3}  # L = 1: weight_decay


def test_natural_order_on_lists_flax_and_haiku_layouts():
    """A list of blocks (positions are ints: 2 < 10), Flax ``params``/``Dense_N`` with a top-level wrapper,
    and Haiku's ``mlp/~/linear_N`` module names all number by depth, where flatten (sorted) order does not."""
    import jax
    import jax.numpy as jnp

    from dualopt.optax import leaf_paths, natural_layer_index

    w = jnp.ones(2)
    blocks = {"blocks": [{"w": w} for _ in range(12)]}
    idx = natural_layer_index(blocks)
    assert [idx["blocks"][i]["w"] for i in range(12)] == list(range(12))
    flax = {"params": {f"Dense_{i}": {"kernel": w, "bias": w} for i in (0, 1, 2, 10, 11)}}
    assert [p[1] for p in leaf_paths(flax)][::2] == ["Dense_0", "Dense_1", "Dense_10", "Dense_11", "Dense_2"]
    idx = natural_layer_index(flax)["params"]
    assert [idx[f"Dense_{i}"]["kernel"] for i in (0, 1, 2, 10, 11)] == [0, 1, 2, 3, 4]
    haiku = {f"mlp/~/linear_{i}": {"w": w, "b": w} for i in (0, 1, 2, 10)}
    idx = natural_layer_index(haiku)
    assert [idx[f"mlp/~/linear_{i}"]["w"] for i in (0, 1, 2, 10)] == [0, 1, 2, 3]
    # A transformer layout: layer k of the encoder is one layer whatever lies below it.
    enc = {"encoder": {f"layers_{i}": {"attn": {"q": w, "k": w}, "mlp": {"w": w}} for i in (0, 1, 2, 10)}}
    idx = natural_layer_index(enc, 2)["encoder"]
    assert [idx[f"layers_{i}"]["attn"]["q"] for i in (0, 1, 2, 10)] == [0, 1, 2, 3]
    assert len(set(jax.tree.leaves(idx["layers_10"]))) == 1


def test_default_leaf_numbering_is_documented_natural_order():
    """The default (``layer_index=None``) numbers leaves in natural key-path order, one layer per leaf, and
    the module docstring says so: JAX's sorted flatten order would put Dense_10 before Dense_2."""
    import dualopt.optax as dx
    from dualopt.optax import dualopt, layer_rates

    assert "sorted key order" in dx.__doc__ and "natural" in dx.__doc__
    params = {f"Dense_{i}": {"kernel": np.ones(1)} for i in (0, 2, 10)}
    rates = layer_rates(dualopt(0.1, weight_decay=0.3), params)
    assert list(rates) == ["Dense_0/kernel", "Dense_10/kernel", "Dense_2/kernel"]  # flatten order
    assert rates["Dense_0/kernel"] < rates["Dense_2/kernel"] < rates["Dense_10/kernel"] == 0.3
