"""The torch.optim conventions of ``DualOpt``: param groups, names, layer keys, the fine-tuning
helper, missing gradients, ``maximize``, ``closure``, ``zero_grad``, ``repr``, mixed dtypes,
``add_param_group``. Every trajectory is checked against the core (bitwise on the reference
path and for SGD, within ``FAST_PATH_TOLERANCE`` for the fast Adam path)."""

from __future__ import annotations

from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

import decoupled_core as dc  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

from tests.torch._torch_helpers import (  # noqa: E402
    ScaledTracker, assert_same_bits, fixed_data, loss_of, make_mlp, reference_optimizer, same_bits)

PATHS = [pytest.param(False, id="reference"), pytest.param(True, id="fast")]


def _params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(params, k, missing=()):
    gen = torch.Generator().manual_seed(1000 + k)
    out = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    return [None if i in missing else g for i, g in enumerate(out)]


def _check_against_core(params, opt, ref, steps, lrs_of, *, exact, missing_at=lambda k: ()):
    """Feed the same gradients to ``opt`` and the core's ``ref`` for ``steps`` steps; compare."""
    initial = [p.detach().clone() for p in params]
    tracker = ScaledTracker(initial)
    for k in range(steps):
        gs = _grads(params, k, missing_at(k))
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(gs, lrs_of(k))
        if exact:
            for i, (p, r) in enumerate(zip(params, ref.params)):
                assert_same_bits(p, r, f"step {k + 1} tensor {i}")
        else:
            tracker.check(params, ref.params, k + 1, f"step {k + 1}")
    assert any(not same_bits(p, q) for p, q in zip(params, initial))


# ----------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("foreach", PATHS)
def test_per_group_hyperparameters_and_paradigms(foreach):
    """Four groups, each with its own lr, direction, betas/momentum, eps and paradigm; two scratch
    groups share one layer numbering (spec section 3) but keep their own weight_decay."""
    params = _params([(4, 3), (3,), (3, 3), (3,), (2, 3), (2,), (5,)])
    groups = [
        {"params": params[0:2], "paradigm": "finetune", "betas": (0.8, 0.99), "rollback_max": 3.0,
         "rollback_min": 0.5, "rollback_power": 2.0},
        {"params": params[2:4], "paradigm": "scratch", "direction": "sgd", "momentum": 0.7, "nesterov": True,
         "lr": 0.05, "weight_decay": 0.3},
        {"params": params[4:6], "paradigm": "none", "eps": 1e-6, "lr": 0.02},
        {"params": params[6:], "paradigm": "scratch", "weight_decay": 0.9},
    ]
    opt = DualOpt(groups, lr=0.01, foreach=foreach)
    ft = dc.HyperParams(paradigm="finetune", beta1=0.8, beta2=0.99, rollback_max=3.0, rollback_min=0.5,
                        rollback_power=2.0)
    sgd = dc.HyperParams(direction="sgd", momentum=0.7, nesterov=True, paradigm="scratch", weight_decay=0.3)
    none = dc.HyperParams(paradigm="none", eps=1e-6)
    sc = dc.HyperParams(paradigm="scratch", weight_decay=0.9)
    hps = [ft, ft, sgd, sgd, none, none, sc]
    ref = reference_optimizer(params, hps, base_lr=0.01)
    # finetune L=2: kappa_max, kappa_min; scratch across groups: L=3 (keys 2, 3, 6), lambda of each group
    assert list(opt.layer_rates().values()) == ref.rates == [3.0, 0.5, 0.3 / 3, 0.3 * 2 / 3, 0.0, 0.0, 0.9]
    lrs = [0.01, 0.01, 0.05, 0.05, 0.02, 0.02, 0.01]
    _check_against_core(params, opt, ref, 15, lambda k: lrs, exact=not foreach)


def test_layers_are_renumbered_when_a_group_is_added():
    params = _params([(3,), (3,), (3,)])
    opt = DualOpt(params[:2], lr=0.1, paradigm="finetune", rollback_max=4.0)
    assert list(opt.layer_rates().values()) == [4.0, 0.0]
    opt.zero_grad()
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    opt.step()
    moved = params[2].detach().clone()
    with torch.no_grad():
        params[2].add_(1.0)  # "unfreeze" a tensor whose value changed since construction
    opt.add_param_group({"params": [params[2]], "paradigm": "finetune"})
    assert list(opt.layer_rates().values()) == [4.0, 2.0, 0.0]
    assert opt.param_groups[1]["rollback_max"] == 4.0  # defaults are the constructor's
    assert_same_bits(opt.state[params[2]]["anchor"], moved + 1.0, "anchored at its value when added")
    with pytest.raises(ValueError, match="paradigm"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "paradigm": "bogus"})
    assert len(opt.param_groups) == 2  # the rejected group was not kept


def test_paradigm_is_fixed_after_construction():
    p = torch.nn.Parameter(torch.ones(2))
    opt = DualOpt([p], lr=0.1)
    opt.param_groups[0]["paradigm"] = "finetune"
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"paradigm.*fixed when the optimizer is created"):
        opt.step()
    assert bool((p == 1).all())


# ----------------------------------------------------------------------------- layer_index and names


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(
        embed=torch.nn.Linear(4, 4, dtype=torch.float64),
        block0=torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.LayerNorm(4, dtype=torch.float64)),
        block1=torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.LayerNorm(4, dtype=torch.float64)),
        head=torch.nn.Linear(4, 2, dtype=torch.float64)))


# names: embed.weight embed.bias block0.0.weight block0.0.bias block0.1.weight block0.1.bias block1.0.* block1.1.* head.*
BLOCK_KEYS = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def _block(name: str) -> int:
    top = name.split(".")[0]
    return {"embed": 0, "block0": 1, "block1": 2, "head": 3}[top]


LAYER_FORMS = {
    "callable": lambda names: _block,
    "dict": lambda names: {n: _block(n) for n in names},
    "sequence": lambda names: [_block(n) for n in names],
    "sparse-keys": lambda names: {n: 10 * _block(n) + 7 for n in names},  # keys need not be contiguous
}


@pytest.mark.parametrize("form", LAYER_FORMS)
def test_layer_index_forms_give_the_same_layers(form):
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    opt = DualOpt(net.named_parameters(), lr=0.01, paradigm="finetune", rollback_max=3.0,
                  layer_index=LAYER_FORMS[form](names))
    rates = opt.layer_rates()
    assert list(rates) == names
    assert list(rates.values()) == [dc.finetune_rate(k, 4, 3.0, 0.0, 1.0) for k in BLOCK_KEYS]


def test_layer_index_none_and_module():
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    per_tensor = DualOpt(net.parameters(), lr=0.01, weight_decay=0.6).layer_rates()
    assert list(per_tensor.values()) == [0.6 * (i + 1) / 12 for i in range(12)]
    assert list(per_tensor) == [f"param_groups[0]['params'][{i}]" for i in range(12)]
    module = DualOpt(net.named_parameters(), lr=0.01, weight_decay=0.6, layer_index="module").layer_rates()
    # one layer per module that owns parameters: embed, block0.0, block0.1, block1.0, block1.1, head
    assert list(module) == names
    assert list(module.values()) == [0.6 * (k + 1) / 6 for k in [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]]


def test_layer_index_per_group_list():
    net = _net()
    named = list(net.named_parameters())
    opt = DualOpt([{"params": named[:10], "paradigm": "finetune", "layer_index": BLOCK_KEYS[:10]},
                   {"params": named[10:], "paradigm": "scratch", "layer_index": [0, 0]}],
                  lr=0.01, rollback_max=3.0)
    rates = list(opt.layer_rates().values())
    assert rates == [dc.finetune_rate(k, 3, 3.0, 0.0, 1.0) for k in BLOCK_KEYS[:10]] + [0.01, 0.01]


@pytest.mark.parametrize("foreach", PATHS)
def test_equivalent_layer_forms_train_identically(foreach):
    runs = []
    for form in ("callable", "sequence"):
        net = _net()
        names = [n for n, _ in net.named_parameters()]
        opt = DualOpt(net.named_parameters(), lr=0.02, paradigm="finetune", layer_index=LAYER_FORMS[form](names),
                      foreach=foreach)
        x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for _ in range(5):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*runs):
        assert_same_bits(p, q)


def test_layer_index_by_name_needs_names():
    net = _net()
    for spec in ("module", _block, {"embed.weight": 0}):
        with pytest.raises(ValueError, match="layer_index"):
            DualOpt(net.parameters(), lr=0.01, layer_index=spec)
    with pytest.raises(ValueError, match="layer_index"):
        DualOpt(net.named_parameters(), lr=0.01, layer_index={"embed.weight": 0})  # a name is missing
    with pytest.raises(ValueError, match="layer_index"):
        DualOpt(net.named_parameters(), lr=0.01, layer_index="blocks")


def test_named_parameters_become_group_names_and_message_names():
    net = _net()
    opt = DualOpt(net.named_parameters(), lr=0.01)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match=r"anchor\['embed.weight'\]"):
        DualOpt(net.named_parameters(), lr=0.01, paradigm="finetune",
                anchor={n: torch.zeros(3, dtype=torch.float64) if n == "embed.weight" else None
                        for n, _ in net.named_parameters()})


# ----------------------------------------------------------------------------- for_finetuning


def test_for_finetuning_groups_and_rates():
    net = _net()
    net.embed.requires_grad_(False)  # a frozen stem is left out
    opt = DualOpt.for_finetuning(net, head="head", lr=0.01, head_lr=0.1, head_weight_decay=0.2,
                                 layer_index="module", rollback_min=1.0)
    backbone, head = opt.param_groups
    assert backbone["paradigm"] == "finetune" and head["paradigm"] == "scratch"
    assert backbone["param_names"] == [n for n, _ in net.named_parameters()][2:10]
    assert head["param_names"] == ["head.weight", "head.bias"]
    assert backbone["lr"] == 0.01 and head["lr"] == 0.1 and head["weight_decay"] == 0.2
    assert backbone["rollback_max"] == 0.01 / 0.01  # resolved from the backbone's lr
    rates = opt.layer_rates()
    # finetune modules block0.0, block0.1, block1.0, block1.1: L = 4, from kappa_max = 1 down to kappa_min = 1
    assert set(list(rates.values())[:8]) == {1.0}
    assert rates["head.weight"] == rates["head.bias"] == 0.2
    for p in net.block0.parameters():
        assert_same_bits(opt.state[p]["anchor"], p.detach(), "snapshot anchor")


def test_for_finetuning_variants():
    net = _net()
    everything = DualOpt.for_finetuning(net, lr=0.01)
    assert [g["paradigm"] for g in everything.param_groups] == ["finetune"]
    none_head = DualOpt.for_finetuning(net, head=["head", "block1"], head_paradigm="none", lr=0.01)
    assert none_head.param_groups[1]["paradigm"] == "none"
    assert none_head.param_groups[1]["param_names"][0] == "block1.0.weight"
    assert "head.bias" in none_head.param_groups[1]["param_names"]
    with pytest.raises(ValueError, match="head='classifier'"):
        DualOpt.for_finetuning(net, head="classifier", lr=0.01)
    with pytest.raises(ValueError, match="paradigm"):
        DualOpt.for_finetuning(net, head="head", paradigm="scratch", lr=0.01)
    with pytest.raises(ValueError, match="head"):
        DualOpt.for_finetuning(net, head="hea", lr=0.01)  # a prefix of a name is not a module name


@pytest.mark.parametrize("foreach", PATHS)
def test_for_finetuning_trains_like_the_core(foreach):
    net = _net()
    params = list(net.parameters())
    opt = DualOpt.for_finetuning(net, head="head", lr=0.02, head_lr=0.05, layer_index="module", foreach=foreach)
    ft = dc.HyperParams(paradigm="finetune", rollback_max=0.01 / 0.02)
    sc = dc.HyperParams(paradigm="scratch")
    keys = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    ref = reference_optimizer(params, [ft] * 10 + [sc] * 2, base_lr=0.02, layer_index=keys)
    assert list(opt.layer_rates().values()) == ref.rates
    _check_against_core(params, opt, ref, 12, lambda k: [0.02] * 10 + [0.05] * 2, exact=not foreach)


# ----------------------------------------------------------------------------- step() conventions


@pytest.mark.parametrize("foreach", PATHS)
def test_params_without_grad_are_skipped_and_their_step_does_not_advance(foreach):
    params = _params([(3, 2), (2,), (4,)])
    opt = DualOpt(params, lr=0.05, paradigm="finetune", foreach=foreach)
    hp = dc.HyperParams(paradigm="finetune", rollback_max=0.01 / 0.05)
    ref = reference_optimizer(params, [hp] * 3, base_lr=0.05)
    missing = {0: (1,), 1: (1, 2), 2: (), 3: (0,), 4: (0, 1, 2), 5: (2,)}
    frozen_before = params[1].detach().clone()
    # the first step: tensor 1 has no gradient, so its step stays 0, its moments zero, and it stays put
    _check_against_core(params, opt, ref, 6, lambda k: 0.05, exact=not foreach, missing_at=lambda k: missing[k])
    counts = [sum(1 for k in range(6) if i not in missing[k]) for i in range(3)]
    assert [opt.state[p]["step"] for p in params] == counts == ref.steps == [4, 3, 3]
    assert not same_bits(params[1], frozen_before)


def test_step_with_no_gradients_at_all_is_a_no_op():
    params = _params([(3,)])
    opt = DualOpt(params, lr=0.05)
    before = params[0].detach().clone()
    assert opt.step() is None
    assert_same_bits(params[0], before)
    st = opt.state[params[0]]  # the state created with the optimizer, untouched
    assert st["step"] == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert opt.skipped == 0


@pytest.mark.parametrize("direction", ["adam", "sgd"])
@pytest.mark.parametrize("foreach", PATHS)
def test_maximize_is_minimising_the_negated_gradient(direction, foreach):
    a, b = _params([(4, 3), (3,)]), _params([(4, 3), (3,)])
    opt_max = DualOpt(a, lr=0.05, direction=direction, paradigm="finetune", maximize=True, foreach=foreach)
    opt_min = DualOpt(b, lr=0.05, direction=direction, paradigm="finetune", foreach=foreach)
    for k in range(6):
        for p, q, g in zip(a, b, _grads(a, k)):
            p.grad, q.grad = g.clone(), -g
        opt_max.step()
        opt_min.step()
    for p, q in zip(a, b):
        assert_same_bits(p, q)
        assert_same_bits(opt_max.state[p]["anchor"], opt_min.state[q]["anchor"])
    assert all(torch.equal(p.grad, -q.grad) for p, q in zip(a, b))  # the user's gradients are left alone


def test_maximize_fast_path_equals_fused_torch_adam():
    a, b = _params([(4, 3), (3,)]), _params([(4, 3), (3,)])
    ours = DualOpt(a, lr=0.05, paradigm="none", maximize=True)
    native = torch.optim.Adam(b, lr=0.05, maximize=True, fused=True)
    for k in range(6):
        for p, q, g in zip(a, b, _grads(a, k)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        native.step()
    for p, q in zip(a, b):
        assert_same_bits(p, q)


@pytest.mark.parametrize("foreach", PATHS)
def test_closure_returns_the_loss_and_its_gradients_are_used(foreach):
    x, y = fixed_data()
    m1, m2 = make_mlp(), make_mlp()
    o1 = DualOpt(m1.parameters(), lr=0.02, paradigm="finetune", foreach=foreach)
    o2 = DualOpt(m2.parameters(), lr=0.02, paradigm="finetune", foreach=foreach)

    def closure():
        o1.zero_grad()
        loss = loss_of(m1, x, y)
        loss.backward()  # step() runs under no_grad; the closure must get autograd back
        return loss

    for _ in range(5):
        loss = o1.step(closure)
        o2.zero_grad()
        expected = loss_of(m2, x, y)
        expected.backward()
        o2.step()
        assert torch.is_tensor(loss) and float(loss.detach()) == float(expected.detach())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert_same_bits(p, q)


def test_zero_grad():
    params = _params([(3,), (2,)])
    opt = DualOpt(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_repr_lists_every_group():
    net = _net()
    opt = DualOpt.for_finetuning(net, head="head", lr=0.01, layer_index="module")
    text = repr(opt)
    lines = text.splitlines()
    assert lines[0] == "DualOpt(nonfinite='skip', skipped=0" and lines[-1] == ")"
    assert lines[1].startswith("  group 0: 10 tensors, layers 0..4 of 5; lr=0.01, direction='adam', "
                               "betas=(0.9, 0.999), eps=1e-08, paradigm='finetune', rollback_max=1.0, "
                               "rollback_min=0.0, rollback_power=1.0")
    assert lines[2].startswith("  group 1: 2 tensors, layers 0..0 of 1; lr=0.01, direction='adam', ")
    assert "paradigm='scratch', weight_decay=0.01" in lines[2]
    sgd = repr(DualOpt([torch.nn.Parameter(torch.zeros(1))], lr=0.5, direction="sgd", paradigm="none"))
    assert "momentum=0.9, nesterov=False, paradigm='none', maximize=False, foreach=None" in sgd


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("foreach", PATHS)
def test_mixed_dtypes_follow_the_state_dtype_rule(foreach):
    """SPEC section 6: float32/float64 compute in their own dtype, bfloat16/float16 in float32 with
    float32 moments and anchors; the parameter keeps its dtype."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bfloat16]
    params = [torch.nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(i),
                                             dtype=torch.float64).to(dt)) for i, dt in enumerate(dtypes)]
    opt = DualOpt([{"params": params[:4], "paradigm": "finetune"}, {"params": params[4:], "paradigm": "scratch"}],
                  lr=0.01, weight_decay=0.5, foreach=foreach)
    ft = dc.HyperParams(paradigm="finetune", rollback_max=1.0)
    sc = dc.HyperParams(paradigm="scratch", weight_decay=0.5)
    ref = reference_optimizer(params, [ft] * 4 + [sc], base_lr=0.01)
    for k in range(8):
        gs = _grads(params, k)
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        ref.step(gs, 0.01)
    for p, r, dt in zip(params, ref.params, dtypes):
        assert p.dtype == dt
        cd = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == cd
        if "anchor" in st:
            assert st["anchor"].dtype == cd
        if not foreach:
            assert_same_bits(p, r, str(dt))
        elif dt in (torch.bfloat16, torch.float16):
            # float32 work within the fast-path tolerance, rounded back once: at most one ulp of dt apart
            ulp = (r.double().abs() * torch.finfo(dt).eps).clamp(min=torch.finfo(dt).smallest_normal)
            assert bool(((p.detach().double() - r.double()).abs() <= ulp).all()), dt
        else:
            ScaledTracker([r]).check([p], [r], 8, str(dt))


def test_bfloat16_anchor_is_exact_and_explicit_float32_anchor_is_kept():
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64).to(torch.bfloat16))
    opt = DualOpt([w], lr=0.01, paradigm="finetune")
    assert opt.state[w]["anchor"].dtype == torch.float32
    assert torch.equal(opt.state[w]["anchor"], w.detach().float())
    fine = torch.randn(6) * 1e-3 + 1.0  # float32 values that bfloat16 cannot hold
    opt2 = DualOpt([("w", w)], lr=0.01, paradigm="finetune", anchor={"w": fine})
    assert_same_bits(opt2.state[w]["anchor"], fine, "float32 anchor of a bfloat16 parameter")
    assert opt2.state[w]["anchor"] is not fine


# ----------------------------------------------------------------------------- bad input specific to torch


def test_torch_specific_bad_input():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"betas=0\.9 is invalid"):
        DualOpt([p], betas=0.9)
    with pytest.raises(ValueError, match=r"maximize=1 is invalid"):
        DualOpt([p], maximize=1)
    with pytest.raises(ValueError, match=r"foreach='yes' is invalid"):
        DualOpt([p], foreach="yes")
    with pytest.raises(ValueError, match="complex64"):
        DualOpt([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="int64"):
        DualOpt([torch.zeros(2, dtype=torch.int64)])
    opt = DualOpt([p])
    p.grad = torch.zeros(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_tensor_lr_of_one_element_is_taken_like_torch_takes_it(shape):
    """torch.optim.Adam takes lr=torch.tensor([1e-2]) (any shape with one element); so does DualOpt."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    ref = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    lr = torch.full(shape, 1e-2, dtype=torch.float64)
    opt = DualOpt([w], lr=lr, paradigm="finetune", rollback_max=2.0)
    plain = DualOpt([ref], lr=1e-2, paradigm="finetune", rollback_max=2.0)
    for o, p in ((opt, w), (plain, ref)):
        p.grad = torch.full((3,), 0.5, dtype=torch.float64)
        o.step()
    assert torch.equal(w.detach(), ref.detach())
    default = DualOpt([torch.nn.Parameter(torch.ones(2))], lr=lr, paradigm="finetune")
    assert default.param_groups[0]["rollback_max"] == pytest.approx(1.0)  # 0.01 / lr


@pytest.mark.parametrize("lr", [torch.tensor([1e-2, 2e-2]), torch.tensor([]), torch.tensor([float("nan")])])
def test_a_bad_tensor_lr_says_what_is_accepted(lr):
    with pytest.raises(ValueError) as err:
        DualOpt([torch.nn.Parameter(torch.ones(2))], lr=lr)
    message = str(err.value)
    assert message.startswith("lr=") and "a finite float >= 0" in message and "one element" in message
