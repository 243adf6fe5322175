"""Issue 18 in the Optax adapter: canonical default numbering, eta_0 of a warm-up schedule, chains, warnings.

Each test here fails on the code before issue 18 (noted per test): the default
numbered Flax trees in flatten order (bias first), a warm-up schedule from 0
was refused with no way out but ``rollback_max``, ``layer_rates``/``anchors``
refused a chain, and nothing warned.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

from decoupled_core import HyperparameterError, LayerOrderWarning, WeightDecayWarning  # noqa: E402
from dualopt.optax import anchors, dualopt, layer_rates  # noqa: E402

# The issue's table, torch's column: a 2-layer MLP finetuned with rollback_max=10.
TORCH_TABLE = [10.0, 6.666666666666668, 3.333333333333334, 0.0]


def _mlp() -> dict:
    return {f"Dense_{i}": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)} for i in range(2)}


def test_issue_table_flax_tree_matches_torch():
    """Old code: {'Dense_0/bias': 10, 'Dense_0/kernel': 6.67, 'Dense_1/bias': 3.33, 'Dense_1/kernel': 0}."""
    rates = layer_rates(dualopt(1e-3, paradigm="finetune", rollback_max=10.0), _mlp())
    assert [rates[k] for k in ("Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel", "Dense_1/bias")] == TORCH_TABLE


def test_flax_linen_sequential_and_torch_give_the_same_table():
    """A real flax.linen nn.Sequential (layers_N) of Dense, LayerNorm, Dense, against torch's own numbering."""
    nn = pytest.importorskip("flax.linen")
    torch = pytest.importorskip("torch")
    from dualopt.torch import DualOpt

    model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    rates = layer_rates(dualopt(1e-3, paradigm="finetune"), params)
    got = [rates[p] for p in ("layers_0/kernel", "layers_0/bias", "layers_1/scale", "layers_1/bias",
                              "layers_2/kernel", "layers_2/bias")]
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    assert got == list(DualOpt(net.named_parameters(), lr=1e-3, paradigm="finetune").layer_rates().values())


def test_flax_linen_per_type_names_warn_and_an_explicit_order_fixes_them():
    """Linen's Conv_0 / BatchNorm_0 counters do not give the definition order: a LayerOrderWarning says so."""
    params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
              "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
              "Conv_1": {"kernel": jnp.ones((1, 1, 2, 2)), "bias": jnp.zeros(2)}}
    with pytest.warns(LayerOrderWarning, match="'BatchNorm_0', 'Conv_0', 'Conv_1'.*layer_index="):
        layer_rates(dualopt(1e-3, paradigm="finetune", rollback_max=5.0), params)
    tx = dualopt(1e-3, paradigm="finetune", rollback_max=5.0, layer_index=["Conv_0", "BatchNorm_0", "Conv_1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rates = layer_rates(tx, params)
    assert [rates[p] for p in ("Conv_0/kernel", "Conv_0/bias", "BatchNorm_0/scale", "BatchNorm_0/bias",
                               "Conv_1/kernel", "Conv_1/bias")] == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])


def test_no_warning_where_ambiguous_siblings_are_in_different_paradigms():
    params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    tx = dualopt(1e-3, paradigm={"backbone": "finetune", "head": "scratch"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.init(params)
        assert layer_rates(tx, params) == {"backbone/w": 0.1 / 1e-3 * 0.1, "head/w": 0.01}
    with pytest.warns(LayerOrderWarning, match="'backbone', 'head'"):
        dualopt(1e-3, paradigm="finetune").init(params)


def test_warmup_from_zero_needs_and_takes_base_learning_rate():
    """Old code: no base_learning_rate argument; the error named only rollback_max."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup_steps=5, decay_steps=50)
    with pytest.raises(HyperparameterError, match=r"base_learning_rate=<the schedule's peak"):
        dualopt(schedule, paradigm="finetune")
    tx = dualopt(schedule, paradigm="finetune", base_learning_rate=2e-3)
    rates = layer_rates(tx, _mlp())
    assert rates["Dense_0/kernel"] == pytest.approx(0.01 / 2e-3, rel=0, abs=0)  # kappa_max = 0.01 / peak
    params, state = _mlp(), tx.init(_mlp())
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))  # eta_1 = schedule(0) = 0
    with pytest.raises(HyperparameterError, match="base_learning_rate"):
        dualopt(schedule, paradigm="finetune", base_learning_rate=0.0)


def test_layer_rates_and_anchors_accept_chain_and_inject_hyperparams():
    """Old code: both raised 'tx=... is invalid: expected a transform returned by dualopt.optax.dualopt'."""
    params = _mlp()
    plain = dualopt(1e-3, paradigm="finetune", rollback_max=10.0)
    chained = optax.chain(optax.clip_by_global_norm(1.0), plain)
    injected = optax.inject_hyperparams(dualopt, static_args=("paradigm",))(1e-3, paradigm="finetune",
                                                                            rollback_max=10.0)
    for tx in (chained, injected, optax.chain(injected)):
        assert layer_rates(tx, params) == layer_rates(plain, params)
        found = anchors(tx, tx.init(params), params)
        np.testing.assert_array_equal(found["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
    with pytest.raises(HyperparameterError, match="exactly one"):
        layer_rates(optax.chain(plain, plain), params)
    with pytest.raises(HyperparameterError, match="exactly one"):
        layer_rates(optax.adam(1e-3), params)


def test_zero_weight_decay_on_finetune_leaves_warns():
    params = _mlp()
    with pytest.warns(WeightDecayWarning, match="rollback_max"):
        dualopt(1e-3, paradigm="finetune", weight_decay=0.0).init(params)
    with pytest.warns(WeightDecayWarning):  # a per-leaf 0 on a finetune leaf, beside scratch leaves
        dualopt(1e-3, paradigm={"Dense_0": "finetune", "Dense_1": "scratch"},
                weight_decay={"Dense_0": 0.0, "Dense_1": 0.1}).init(params)
    with warnings.catch_warnings():  # a single 0 with scratch leaves is their lambda: no warning
        warnings.simplefilter("error")
        dualopt(1e-3, paradigm={"Dense_0": "finetune", "Dense_1": "scratch"}, weight_decay=0.0).init(params)


def test_flax_nnx_state_numbers_like_torch_without_a_warning():
    """Old code: nnx.state(...) leaves end in the Variable's 'value' attribute (flax 0.12), so the roles were
    unknown and the order was bias first; anchors taken at init were not found at update
    (tests/optax/test_optax_flax_nnx.py failed the same way)."""
    nnx = pytest.importorskip("flax.nnx")
    torch = pytest.importorskip("torch")
    from dualopt.torch import DualOpt

    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)),
                           nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rates = layer_rates(dualopt(1e-3, paradigm="finetune"), nnx.state(model, nnx.Param))
    got = [rates[p] for p in ("layers/0/kernel", "layers/0/bias", "layers/1/scale", "layers/1/bias",
                              "layers/2/kernel", "layers/2/bias")]
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    assert got == list(DualOpt(net.named_parameters(), lr=1e-3, paradigm="finetune").layer_rates().values())
