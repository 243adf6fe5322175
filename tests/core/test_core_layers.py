"""Layer numbering (dense ranking per paradigm) and the scratch / finetune rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import decoupled_core as dc
from decoupled_core import HyperparameterError, HyperParams


def test_default_numbering_is_position_within_each_paradigm():
    paradigms = ["finetune", "scratch", "finetune", "none", "scratch", "finetune"]
    assert dc.number_layers(paradigms) == [(0, 3), (0, 2), (1, 3), (0, 1), (1, 2), (2, 3)]


def test_layer_keys_are_dense_ranked_and_shared():
    # Keys 7, 3, 3, 42 -> distinct sorted (3, 7, 42): ranks 1, 0, 0, 2; shared keys share a layer.
    assert dc.number_layers(["finetune"] * 4, [7, 3, 3, 42]) == [(1, 3), (0, 3), (0, 3), (2, 3)]


def test_layer_keys_are_ranked_per_paradigm():
    paradigms = ["finetune", "scratch", "finetune", "scratch", "none"]
    keys = [10, 10, 20, 5, 10]
    # finetune keys {10, 20}; scratch keys {5, 10}; none {10}.
    assert dc.number_layers(paradigms, keys) == [(0, 2), (1, 2), (1, 2), (0, 2), (0, 1)]


def test_numpy_integer_keys_are_accepted():
    keys = np.array([2, 0, 2], dtype=np.int64)
    assert dc.number_layers(["scratch"] * 3, list(keys)) == [(1, 2), (0, 2), (1, 2)]


def test_empty_parameter_list():
    assert dc.number_layers([]) == []
    assert dc.layer_rates([]) == []


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, "1", None, True, np.int64(-3), np.float64(2.0)])
def test_bad_layer_key_names_argument_value_and_range(bad):
    with pytest.raises(HyperparameterError) as info:
        dc.number_layers(["finetune", "finetune"], [0, bad], name="layer_index")
    msg = str(info.value)
    assert msg == f"layer_index={bad!r} is invalid: expected a non-negative integer layer key for every tensor."


def test_layer_index_error_uses_the_public_name():
    with pytest.raises(HyperparameterError, match=r"^layer_idx=-2 is invalid: expected a non-negative"):
        dc.number_layers(["scratch"], [-2], name="layer_idx")


@pytest.mark.parametrize("keys", [[0], [0, 1, 2]])
def test_layer_index_of_wrong_length(keys):
    with pytest.raises(HyperparameterError) as info:
        dc.number_layers(["scratch", "scratch"], keys)
    msg = str(info.value)
    assert msg.startswith(f"layer_index='<{len(keys)} entries>' is invalid: expected ")
    assert "one layer index per parameter tensor (2)" in msg


def test_unknown_paradigm_in_numbering():
    with pytest.raises(HyperparameterError, match=r"^paradigm='pretrain' is invalid: expected one of \('scratch', 'finetune', 'none'\)\.$"):
        dc.number_layers(["scratch", "pretrain"])


def test_scratch_rate_ramps_to_weight_decay():
    rates = [dc.scratch_rate(l, 5, 0.3) for l in range(5)]
    # Exact host float64 expression, in the spec's order: lambda * ((l + 1) / L).
    assert rates == [0.3 * ((l + 1) / 5) for l in range(5)]
    assert rates[-1] == 0.3
    assert all(a < b for a, b in zip(rates, rates[1:]))


def test_scratch_rate_single_layer_is_weight_decay():
    assert dc.scratch_rate(0, 1, 0.125) == 0.125


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, 3.7])
def test_finetune_rate_endpoints_and_monotonic(power):
    kmax, kmin, L = 6.0, 1.5, 7
    rates = [dc.finetune_rate(l, L, kmax, kmin, power) for l in range(L)]
    assert rates[0] == kmax
    assert rates[-1] == kmin  # (1 - 1)**p == 0 exactly: no NaN for fractional p
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates == [kmin + (1.0 - l / (L - 1)) ** power * (kmax - kmin) for l in range(L)]


def test_finetune_fractional_power_last_tensor_is_finite():
    # OLOR's published code adds eps inside (1 - i/(n-1)) and gets NaN here; the spec does not.
    rate = dc.finetune_rate(3, 4, 2.0, 0.0, 0.5)
    assert rate == 0.0 and math.isfinite(rate)
    hp = HyperParams(paradigm="finetune", rollback_max=2.0, rollback_power=0.5)
    rates = dc.layer_rates([hp] * 4)
    assert all(math.isfinite(r) for r in rates)
    assert rates[-1] == 0.0


def test_finetune_single_layer_is_rollback_max():
    # L == 1 would divide by zero in l/(L-1); the spec defines rho = kappa_max.
    assert dc.finetune_rate(0, 1, 4.0, 1.0, 0.5) == 4.0
    hp = HyperParams(paradigm="finetune", rollback_max=4.0, rollback_min=1.0)
    assert dc.layer_rates([hp, HyperParams(paradigm="scratch", weight_decay=0.2)]) == [4.0, 0.2]


def test_pull_rate_per_paradigm():
    hp = HyperParams(weight_decay=0.4, rollback_max=3.0, rollback_min=1.0, rollback_power=2.0)
    assert dc.pull_rate("scratch", 1, 4, hp) == 0.4 * (2 / 4)
    assert dc.pull_rate("finetune", 1, 3, hp) == 1.0 + (1.0 - 1 / 2) ** 2.0 * (3.0 - 1.0)
    assert dc.pull_rate("none", 2, 5, hp) == 0.0


def test_pull_rate_requires_resolved_rollback_max():
    with pytest.raises(ValueError, match="rollback_max must be resolved"):
        dc.pull_rate("finetune", 0, 2, HyperParams(paradigm="finetune"))


def test_layer_rates_mixed_groups_share_numbering_but_not_rates():
    ft_a = HyperParams(paradigm="finetune", rollback_max=4.0)
    ft_b = HyperParams(paradigm="finetune", rollback_max=8.0, rollback_min=2.0)
    sc = HyperParams(paradigm="scratch", weight_decay=0.9)
    rates = dc.layer_rates([ft_a, sc, ft_b, sc, ft_a], layer_index=[0, 0, 1, 1, 2])
    # finetune layers 0, 1, 2 of L = 3 with each tensor's own group; scratch layers 0, 1 of L = 2.
    assert rates == [4.0, 0.9 * (1 / 2), 2.0 + 0.5 * 6.0, 0.9, 0.0]


# --- the canonical default order (spec section 3) ------------------------------------------------------------

def test_canonical_order_puts_weight_before_bias_and_numbers_modules_naturally():
    """Flax flattens bias before kernel and Dense_10 before Dense_2; the canonical order undoes both."""
    from decoupled_core import canonical_order

    paths = [("Dense_0", "bias"), ("Dense_0", "kernel"), ("Dense_10", "bias"), ("Dense_10", "kernel"),
             ("Dense_2", "bias"), ("Dense_2", "kernel")]
    keys, ambiguous = canonical_order(paths)
    assert [paths[i] for i in sorted(range(6), key=keys.__getitem__)] == [
        ("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_2", "kernel"), ("Dense_2", "bias"),
        ("Dense_10", "kernel"), ("Dense_10", "bias")]
    assert ambiguous == []


def test_canonical_order_roles_scale_before_offset_unknown_between():
    from decoupled_core import canonical_order

    paths = [("layers_1", "bias"), ("layers_1", "scale"), ("layers_0", "bias"), ("layers_0", "recurrent_kernel"),
             ("layers_0", "kernel")]
    keys, ambiguous = canonical_order(paths)
    order = [paths[i] for i in sorted(range(len(paths)), key=keys.__getitem__)]
    assert order == [("layers_0", "kernel"), ("layers_0", "recurrent_kernel"), ("layers_0", "bias"),
                     ("layers_1", "scale"), ("layers_1", "bias")]
    assert ambiguous == []


@pytest.mark.parametrize("paths, named", [
    ([("encoder", "w"), ("head", "w")], "'encoder', 'head'"),
    ([("Conv_0", "kernel"), ("BatchNorm_0", "scale"), ("Conv_1", "kernel")], "'BatchNorm_0', 'Conv_0', 'Conv_1'"),
    ([("attn", "query"), ("attn", "key")], "'key', 'query'"),
    ([("lstm_0", "kernel"), ("dense_1", "kernel")], "'dense_1', 'lstm_0'"),
])
def test_canonical_order_reports_what_the_names_do_not_say(paths, named):
    from decoupled_core import canonical_order

    _, ambiguous = canonical_order(paths)
    assert len(ambiguous) == 1 and named in ambiguous[0]


def test_canonical_order_takes_an_explicit_module_order():
    from decoupled_core import HyperparameterError, canonical_order

    paths = [("BatchNorm_0", "bias"), ("BatchNorm_0", "scale"), ("Conv_0", "bias"), ("Conv_0", "kernel")]
    keys, ambiguous = canonical_order(paths, module_order=[("Conv_0",), ("BatchNorm_0",)])
    assert keys == [3, 2, 1, 0] and ambiguous == []

    with pytest.raises(HyperparameterError, match="covers every tensor"):
        canonical_order(paths, module_order=[("Conv_0",)])
    with pytest.raises(HyperparameterError, match="distinct module paths"):
        canonical_order(paths, module_order=[("Conv_0",), ("Conv_0",)])


def test_canonical_order_of_a_flat_list_is_its_positions():
    from decoupled_core import canonical_order

    assert canonical_order([(i,) for i in (0, 1, 10, 2)]) == ([0, 1, 3, 2], [])
    assert canonical_order([("layers", 1, "w"), ("layers", 0, "w")]) == ([1, 0], [])
