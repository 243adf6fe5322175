"""``state_dict()`` / ``load_state_dict()``, ``torch.save``/``torch.load(weights_only=True)``, ``copy.deepcopy``.

Resume: train, save the model's, the optimizer's and the scheduler's state mid-run,
build everything afresh (a *different* initialisation, so the new optimizer's
snapshot anchors are wrong until the saved ones are loaded), load, continue: the
weights and the whole optimizer state equal the uninterrupted run's bit for bit,
in scratch and finetune mode (anchors included), on both paths, for Adam and SGD.
"""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")

from dualopt.torch import STATE_FORMAT, DualOpt  # noqa: E402

from tests.torch._torch_helpers import assert_same_bits, fixed_data, loss_of, make_mlp, same_bits  # noqa: E402

STEPS, SPLIT = 30, 13


def _optimizer(model, setup: str, direction: str, foreach: bool):
    """DualOpt and its scheduler for ``model`` (the finetune setup snapshots the model's weights now)."""
    kw = dict(lr=0.02, direction=direction, foreach=foreach)
    if setup == "finetune":
        opt = DualOpt.for_finetuning(model, head="4", layer_index="module", head_weight_decay=0.5, **kw)
    else:
        opt = DualOpt(model.named_parameters(), paradigm="scratch", weight_decay=0.5, **kw)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)


def _build(setup: str, direction: str, foreach: bool, seed: int = 0):
    model = make_mlp(seed)
    return (model, *_optimizer(model, setup, direction, foreach))


def _train(model, opt, sched, steps, x, y, *, drop_grad_at=None):
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if drop_grad_at is not None and t == drop_grad_at:
            model[0].bias.grad = None  # one tensor without a gradient: its step count lags behind
        opt.step()
        sched.step()


def _assert_same_state(a: DualOpt, b: DualOpt) -> None:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        assert_same_bits(p, q, "parameter")
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert_same_bits(sa[k], sb[k], k)
            else:
                assert sa[k] == sb[k] and type(sa[k]) is type(sb[k]), k
    assert a.skipped == b.skipped
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}


@pytest.mark.parametrize("via", ["memory", "torch.save"])
@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("direction", ["adam", "sgd"])
@pytest.mark.parametrize("setup", ["scratch", "finetune"])
def test_resume_mid_run_is_bitwise_equal_to_uninterrupted(setup, direction, foreach, via):
    x, y = fixed_data()
    model, opt, sched = _build(setup, direction, foreach)
    anchors_before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, sched, STEPS, x, y, drop_grad_at=4)

    model2, opt2, sched2 = _build(setup, direction, foreach)
    _train(model2, opt2, sched2, SPLIT, x, y, drop_grad_at=4)
    # NaN gradients once, so that the skip counter is part of what must survive.
    for p in model2.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt2.step()
    assert opt2.skipped == 1
    saved = {"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}
    if via == "torch.save":
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
    else:
        saved = copy.deepcopy(saved)  # state_dict() shares the live tensors, like torch.optim's
    del model2, opt2, sched2

    model3 = make_mlp(seed=1)  # another initialisation, overwritten by the checkpoint
    model3.load_state_dict(saved["model"])
    opt3, sched3 = _optimizer(model3, setup, direction, foreach)
    if setup == "finetune":  # a new optimizer snapshots the current (mid-run) weights: not the anchors
        p0 = next(model3.parameters())
        assert not same_bits(opt3.state[p0]["anchor"], anchors_before[0])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    assert opt3.skipped == 1
    if setup == "finetune":
        for p, a in zip(list(model3.parameters())[:4], anchors_before):
            assert_same_bits(opt3.state[p]["anchor"], a, "restored anchor")
    _train(model3, opt3, sched3, STEPS - SPLIT, x, y)
    opt3.skipped = opt.skipped = 0  # the uninterrupted run had no NaN step
    _assert_same_state(opt, opt3)
    assert opt3.state[model3[0].bias]["step"] == STEPS - 1 and opt3.state[model3[0].weight]["step"] == STEPS


def test_state_dict_layout_and_format_tag():
    x, y = fixed_data()
    model, opt, sched = _build("finetune", "adam", True)
    _train(model, opt, sched, 2, x, y)
    sd = opt.state_dict()
    assert "dualopt" not in sd and set(sd) == {"state", "param_groups"}  # torch's layout, nothing else
    # The format tag and the skip counter ride in every group (torch's distributed helpers keep groups).
    assert [(g["dualopt"], g["skipped"]) for g in sd["param_groups"]] == [(STATE_FORMAT, 0)] * 2
    assert [g["paradigm"] for g in sd["param_groups"]] == ["finetune", "scratch"]
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sd["param_groups"][0]["layer_index"] == [0, 0, 1, 1]
    assert sd["param_groups"][0]["rollback_max"] == 0.01 / 0.02  # stored resolved
    first = sd["state"][0]
    assert set(first) == {"step", "exp_avg", "exp_avg_sq", "anchor"} and first["step"] == 2
    assert set(sd["state"][4]) == {"step", "exp_avg", "exp_avg_sq"}  # the head has no anchor


def test_load_copies_the_given_tensors():
    x, y = fixed_data()
    model, opt, sched = _build("finetune", "adam", False)
    _train(model, opt, sched, 3, x, y)
    sd = copy.deepcopy(opt.state_dict())
    model2, opt2, _ = _build("finetune", "adam", False)
    opt2.load_state_dict(sd)
    p = next(model2.parameters())
    before = opt2.state[p]["anchor"].clone()
    for entry in sd["state"].values():
        for v in entry.values():
            if torch.is_tensor(v):
                v.add_(1.0)
    assert_same_bits(opt2.state[p]["anchor"], before, "anchor after the caller changed its dict")


@pytest.mark.parametrize("named", [True, False])
def test_loading_into_a_differently_shaped_model_names_the_parameter(named):
    x, y = fixed_data()
    model = make_mlp()
    opt = DualOpt(model.named_parameters() if named else model.parameters(), lr=0.01, paradigm="finetune")
    loss_of(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    other = make_mlp(sizes=(6, 16, 8, 3))  # same tensor count, the middle layer narrower
    opt2 = DualOpt(other.named_parameters() if named else other.parameters(), lr=0.01, paradigm="finetune")
    with pytest.raises(ValueError) as err:
        opt2.load_state_dict(sd)
    name = "'2.weight'" if named else "param_groups[0]['params'][2]"
    msg = str(err.value)
    assert name in msg and "(16, 16)" in msg and "(8, 16)" in msg, msg
    assert msg.startswith("state_dict=") and "is invalid: expected" in msg and "\\" not in msg
    # Nothing was half-loaded: still the state a fresh optimizer creates.
    for p in other.parameters():
        st = opt2.state[p]
        assert set(st) == {"anchor", "step", "exp_avg", "exp_avg_sq"} and st["step"] == 0
        assert_same_bits(st["anchor"], p.detach(), "anchor")
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any() and st["exp_avg"].shape == p.shape


def test_loading_other_states_fails_loudly():
    model = make_mlp()
    x, y = fixed_data()
    adam = torch.optim.Adam(model.parameters())
    loss_of(model, x, y).backward()
    adam.step()
    opt = DualOpt(model.parameters(), lr=0.01, paradigm="finetune")
    with pytest.raises(ValueError, match="a DualOpt state dict"):
        opt.load_state_dict(adam.state_dict())
    sgd_opt = DualOpt(model.parameters(), lr=0.01, direction="sgd", paradigm="finetune")
    sgd_opt.step()
    with pytest.raises(ValueError, match=r"direction='adam'"):
        opt.load_state_dict(sgd_opt.state_dict())
    scratch = DualOpt(model.parameters(), lr=0.01, paradigm="scratch")
    with pytest.raises(ValueError, match=r"paradigm='finetune'"):
        opt.load_state_dict(scratch.state_dict())
    two_groups = DualOpt([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}],
                         lr=0.01, paradigm="finetune")
    with pytest.raises(ValueError, match="2 param groups"):
        opt.load_state_dict(two_groups.state_dict())
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq_max"] = torch.zeros(1)
    with pytest.raises(ValueError, match="exp_avg_sq_max"):
        DualOpt(model.parameters(), lr=0.01, paradigm="finetune").load_state_dict(sd)


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "fast"])
def test_low_precision_state_stays_float32_through_save_and_load(foreach):
    """SPEC section 6: a bfloat16 parameter's moments and anchor are float32; torch's
    load_state_dict would cast them to bfloat16 (losing the anchor's exactness for the moments,
    and every moment's precision); DualOpt keeps them float32, bit for bit."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=dt)) for dt in (torch.bfloat16, torch.float32,
                                                                           torch.float64, torch.float16)]
    opt = DualOpt(params, lr=0.01, paradigm="finetune", foreach=foreach)
    for k in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=torch.float64).to(p.dtype)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DualOpt(clones, lr=0.01, paradigm="finetune", foreach=foreach)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, clones):
        cd = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        for k in ("exp_avg", "exp_avg_sq", "anchor"):
            assert opt2.state[q][k].dtype == cd, (p.dtype, k)
            assert_same_bits(opt2.state[q][k], opt.state[p][k], f"{p.dtype} {k}")
        assert opt2.state[q]["step"] == 3
    # ... and both continue identically.
    for p, q in zip(params, clones):
        p.grad = torch.randn(p.shape, dtype=torch.float64).to(p.dtype)
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, clones):
        assert_same_bits(p, q)


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "fast"])
def test_deepcopy_of_model_and_optimizer_trains_identically_and_independently(foreach):
    x, y = fixed_data()
    model, opt, sched = _build("finetune", "adam", foreach)
    _train(model, opt, sched, 3, x, y)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    assert opt2.state[model2[0].weight]["anchor"] is not opt.state[model[0].weight]["anchor"]
    frozen = [p.detach().clone() for p in model.parameters()]
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.7)
    _train(model2, opt2, sched2, 5, x, y)
    for p, q in zip(model.parameters(), frozen):  # the original did not move
        assert_same_bits(p, q, "original after the copy trained")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    _train(model, opt, sched, 5, x, y)
    _assert_same_state(opt, opt2)


def test_deepcopy_of_optimizer_alone():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = DualOpt([p], lr=0.1, paradigm="finetune")
    p.grad = torch.ones_like(p)
    opt.step()
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    assert q is not p and same_bits(q, p)
    q.grad = p.grad.clone()
    clone.step()
    assert not same_bits(q, p) and clone.state[q]["step"] == 2 and opt.state[p]["step"] == 1
    opt.step()
    assert_same_bits(p, q)


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "fast"])
def test_cleared_or_reassigned_state_is_used_not_a_stale_copy(foreach):
    """``optimizer.state.clear()`` (a restart) and reassigning a state entry: the next steps use the
    new state, exactly like a fresh optimizer (the fast path's cached lists must not go stale)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    opt = DualOpt([p], lr=0.1, paradigm="scratch", weight_decay=0.5, foreach=foreach)
    for _ in range(3):
        p.grad = torch.randn(5, 4, dtype=torch.float64)
        opt.step()
    opt.state.clear()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = DualOpt([q], lr=0.1, paradigm="scratch", weight_decay=0.5, foreach=foreach)
    for k in range(4):
        g = torch.randn(5, 4, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        if k == 2:  # reset the second moment by reassignment, on both
            for o, t in ((opt, p), (fresh, q)):
                o.state[t]["exp_avg_sq"] = torch.zeros_like(t)
        opt.step()
        fresh.step()
        assert_same_bits(p, q, f"step {k}")
        assert opt.state[p]["step"] == fresh.state[q]["step"] == k + 1


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "fast"])
def test_finetune_step_without_anchor_fails_naming_the_parameter(foreach):
    net = make_mlp()
    opt = DualOpt(net.named_parameters(), lr=0.01, paradigm="finetune", foreach=foreach)
    opt.state.clear()
    x, y = fixed_data()
    loss_of(net, x, y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"finetune tensor '0\.weight' has no 'anchor'"):
        opt.step()
    assert all(same_bits(p, q) for p, q in zip(net.parameters(), before))
