"""State created with the optimizer, and torch's own checkpoint recipes, unchanged, in one process.

``torch.distributed.checkpoint`` works without a process group too, so the
recipes of its docs run here on a plain model (the sharded FSDP2 case is
``tests/torch/test_torch_distributed.py``):

- ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (nested, or with
  ``StateDictOptions(flatten_optimizer_state_dict=True)``, or ``full_state_dict=True``);
- ``get_state_dict`` -> ``dcp.save``; a fresh model and optimizer ->
  ``get_state_dict`` (the load template) -> ``dcp.load`` -> ``set_state_dict``.

Two things make them work: DualOpt creates its whole state (``step = 0``,
zero moments, anchors) with the optimizer, so a fresh optimizer's
``state_dict()`` is a complete template (torch's helpers otherwise run a
zero-gradient step at lr 0, and only when ``optimizer.state`` is empty, which
DualOpt's anchors prevent); and the format tag and skip counter are stored in
every param group, the part of the dict the helpers keep. A resume through
each recipe equals the uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from dualopt.torch import STATE_FORMAT, DualOpt  # noqa: E402

from tests.torch._torch_helpers import assert_same_bits, fixed_data, loss_of, make_mlp, same_bits  # noqa: E402

STEPS, SPLIT = 16, 7
# dcp.save/load without a process group say once that they run in one process: the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _optimizer(model: torch.nn.Module, direction: str = "adam", foreach: bool | None = None) -> DualOpt:
    return DualOpt.for_finetuning(model, head="4", lr=0.02, layer_index="module", head_weight_decay=0.5,
                                  direction=direction, foreach=foreach)


def _train(model, opt, steps, x, y, *, nan_at=None):
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if t == 3:
            model[0].bias.grad = None  # a tensor without a gradient once: its step lags behind
        if t == nan_at:
            model[2].weight.grad[0, 0] = float("nan")  # skipped (spec section 8) and counted
        opt.step()


def _assert_same_state(a: DualOpt, b: DualOpt) -> None:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        assert_same_bits(p, q, "parameter")
        assert a.state[p].keys() == b.state[q].keys()
        for k, v in a.state[p].items():
            if torch.is_tensor(v):
                assert_same_bits(v, b.state[q][k], k)
            else:
                assert v == b.state[q][k] and type(v) is type(b.state[q][k]), k
    assert a.skipped == b.skipped
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert _settings(ga) == _settings(gb)


def _settings(group: dict) -> dict:
    # full_state_dict=True passes the dict through torch's _flatten_state_dict/_unflatten_state_dict,
    # which return the betas tuple as a list (torch.optim.Adam's too): the same numbers.
    return {k: tuple(v) if k == "betas" else v for k, v in group.items() if k != "params"}


# ----------------------------------------------------------------------------- state at construction
def test_state_is_created_with_the_optimizer():
    torch.manual_seed(0)
    shapes = [(3, 2), (2,), (4,), (5,)]
    params = [torch.nn.Parameter(torch.randn(s).to(dt))
              for s, dt in zip(shapes, (torch.float32, torch.bfloat16, torch.float64, torch.float32))]
    params[3].requires_grad_(False)  # frozen: only its anchor
    opt = DualOpt([{"params": params[:2], "paradigm": "finetune"},
                   {"params": params[2:3], "paradigm": "scratch", "direction": "sgd"},
                   {"params": params[3:], "paradigm": "finetune"}], lr=0.01)
    for p, keys in zip(params, ({"step", "exp_avg", "exp_avg_sq", "anchor"}, {"step", "exp_avg", "exp_avg_sq", "anchor"},
                                {"step", "momentum_buffer"}, {"anchor"})):
        st = opt.state[p]
        assert set(st) == keys, (p.shape, set(st))
        cd = torch.float32 if p.dtype == torch.bfloat16 else p.dtype
        for k, v in st.items():
            if k == "step":
                assert v == 0 and v.dtype == torch.float32 and v.shape == () and v.device == p.device
            elif k == "anchor":
                assert v.dtype == cd and same_bits(v, p.detach().to(cd)) and v.data_ptr() != p.data_ptr()
            else:
                assert v.dtype == cd and v.shape == p.shape and not v.any(), k
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert [(g["dualopt"], g["skipped"]) for g in sd["param_groups"]] == [(STATE_FORMAT, 0)] * 3
    # add_param_group creates the new tensors' state too (and its groups carry the tags).
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "paradigm": "finetune"})
    assert set(opt.state[extra]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}
    assert (opt.param_groups[-1]["dualopt"], opt.param_groups[-1]["skipped"]) == (STATE_FORMAT, 0)
    # The frozen tensor gets its moments once it has a gradient (unfrozen later).
    params[3].requires_grad_(True)
    params[3].grad = torch.ones(5)
    opt.step()
    assert opt.state[params[3]]["step"] == 1 and set(opt.state[params[3]]) >= {"exp_avg", "exp_avg_sq"}
    assert [opt.state[p]["step"] for p in params[:3]] == [0, 0, 0]  # no gradient: step stays 0


def test_skip_counter_is_in_every_group():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = DualOpt([{"params": [p]}, {"params": [q], "paradigm": "none"}], lr=0.1)
    p.grad, q.grad = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, float("inf")], dtype=torch.float64)
    opt.step()
    assert opt.skipped == 1 and [g["skipped"] for g in opt.param_groups] == [1, 1]
    sd = copy.deepcopy(opt.state_dict())
    opt.skipped = 0
    assert [g["skipped"] for g in opt.param_groups] == [0, 0]
    opt.load_state_dict(sd)
    assert opt.skipped == 1 and [g["skipped"] for g in opt.param_groups] == [1, 1]


def test_torch_helpers_leave_a_fresh_optimizer_untouched():
    """torch's ``_init_optim_state`` steps an optimizer whose ``state`` is empty (zero gradients, lr 0):
    DualOpt's is never empty, so taking the template changes no weight, step or gradient."""
    model = make_mlp()
    opt = _optimizer(model)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    msd, osd = get_state_dict(model, opt)
    assert all(p.grad is None for p in model.parameters())
    assert all(same_bits(p, w) for p, w in zip(model.parameters(), weights))
    assert sorted(osd["state"]) == sorted(n for n, _ in model.named_parameters())
    for name, entry in osd["state"].items():
        assert entry["step"] == 0, name
    after = opt.state_dict()
    for pid, entry in before["state"].items():
        for k, v in entry.items():
            assert same_bits(v, after["state"][pid][k]) if torch.is_tensor(v) else v == after["state"][pid][k]


# ----------------------------------------------------------------------------- the recipes
RECIPES = ["optimizer_state_dict", "flattened", "full_state_dict", "dcp", "dcp-flattened"]


def _save(recipe: str, model, opt, path) -> object:
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    if recipe == "optimizer_state_dict":
        return copy.deepcopy(get_optimizer_state_dict(model, opt))  # the live tensors go on training
    if recipe == "flattened":
        return copy.deepcopy(get_optimizer_state_dict(model, opt, options=flat))
    if recipe == "full_state_dict":
        return copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
    msd, osd = get_state_dict(model, opt, options=flat if recipe == "dcp-flattened" else None)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    return None


def _load(recipe: str, model, opt, saved, path) -> None:
    if recipe in ("optimizer_state_dict", "flattened", "full_state_dict"):
        options = {"flattened": StateDictOptions(flatten_optimizer_state_dict=True),
                   "full_state_dict": StateDictOptions(full_state_dict=True)}.get(recipe)
        set_optimizer_state_dict(model, opt, saved, options=options)
        return
    options = StateDictOptions(flatten_optimizer_state_dict=True) if recipe == "dcp-flattened" else None
    msd, osd = get_state_dict(model, opt, options=options)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("direction", "foreach"), [("adam", None), ("adam", False), ("sgd", None)],
                         ids=["adam-fast", "adam-reference", "sgd-fast"])
def test_torch_checkpoint_recipes_resume_bitwise(recipe, direction, foreach, tmp_path):
    x, y = fixed_data()
    model = make_mlp()
    opt = _optimizer(model, direction, foreach)
    anchors = [p.detach().clone() for p in list(model.parameters())[:4]]
    _train(model, opt, SPLIT, x, y, nan_at=5)
    assert opt.skipped == 1
    saved = _save(recipe, model, opt, tmp_path)
    model_sd = copy.deepcopy(model.state_dict())
    _train(model, opt, STEPS - SPLIT, x, y)

    fresh = make_mlp(seed=1)  # another initialisation: its optimizer's anchor snapshot is wrong until loaded
    fresh_opt = _optimizer(fresh, direction, foreach)
    if recipe.startswith("dcp"):
        _load(recipe, fresh, fresh_opt, saved, tmp_path)  # the model comes from the checkpoint too
    else:
        fresh.load_state_dict(model_sd)
        _load(recipe, fresh, fresh_opt, saved, tmp_path)
    assert fresh_opt.skipped == 1 and [g["skipped"] for g in fresh_opt.param_groups] == [1, 1]
    for p, a in zip(list(fresh.parameters())[:4], anchors):
        assert_same_bits(fresh_opt.state[p]["anchor"], a, "restored anchor")
    assert fresh_opt.state[fresh[0].bias]["step"] == SPLIT - 2  # one skipped step, one without a gradient
    _train(fresh, fresh_opt, STEPS - SPLIT, x, y)
    _assert_same_state(opt, fresh_opt)


def test_frozen_tensor_without_saved_entry_keeps_its_state():
    """The helpers save and load state only for tensors that require grad; a frozen finetune tensor's
    anchor is then not in the dict handed to ``load_state_dict``, and it keeps the one it has."""
    x, y = fixed_data()
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    opt = DualOpt(model.named_parameters(), lr=0.02, paradigm="finetune", layer_index="module")
    _train(model, opt, SPLIT, x, y)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    model_sd = copy.deepcopy(model.state_dict())
    _train(model, opt, STEPS - SPLIT, x, y)
    fresh = make_mlp(seed=1)
    fresh[0].weight.requires_grad_(False)
    fresh.load_state_dict(model_sd)
    fresh_opt = DualOpt(fresh.named_parameters(), lr=0.02, paradigm="finetune", layer_index="module")
    set_optimizer_state_dict(fresh, fresh_opt, saved)
    assert set(fresh_opt.state[fresh[0].weight]) == {"anchor"}
    _train(fresh, fresh_opt, STEPS - SPLIT, x, y)
    _assert_same_state(opt, fresh_opt)


# ----------------------------------------------------------------------------- formats
def test_a_state_dict_of_the_first_layout_is_refused_with_a_clear_error():
    """The first layout (never released) had a top-level ``"dualopt"`` entry and no tags in the groups; its
    reader is gone (issue 20): such a dict is refused like any untagged one, and nothing is loaded."""
    x, y = fixed_data()
    model = make_mlp()
    opt = _optimizer(model)
    _train(model, opt, SPLIT, x, y, nan_at=5)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["dualopt"], g["skipped"]
    sd["dualopt"] = {"format": STATE_FORMAT, "skipped": 1}
    fresh = make_mlp(seed=1)
    fresh_opt = _optimizer(fresh)
    with pytest.raises(ValueError, match="a DualOpt state dict .* state from another optimizer cannot be loaded"):
        fresh_opt.load_state_dict(sd)
    _assert_same_state(fresh_opt, _optimizer(make_mlp(seed=1)))  # as created: skipped 0, zero moments


def _tagged_state() -> dict:
    x, y = fixed_data()
    model = make_mlp()
    opt = _optimizer(model)
    _train(model, opt, 2, x, y)
    return copy.deepcopy(opt.state_dict())


def _drop_tags(sd):
    for g in sd["param_groups"]:
        del g["dualopt"]


def _drop_one_tag(sd):
    del sd["param_groups"][1]["dualopt"]


def _other_tag(sd):
    sd["param_groups"][0]["dualopt"] = "dualopt.torch/0"


def _uneven_counter(sd):
    sd["param_groups"][1]["skipped"] = 2


def _negative_counter(sd):
    for g in sd["param_groups"]:
        g["skipped"] = -1


BAD = {
    "no tags": (_drop_tags, ["<dict with keys ['param_groups', 'state']>", STATE_FORMAT, "another optimizer"]),
    "one group untagged": (_drop_one_tag, ["<dict with keys ['param_groups', 'state']> (its param group 1 has "
                                           "no 'dualopt' tag)", "every param group"]),
    "other tag": (_other_tag, ["'dualopt': 'dualopt.torch/0'", STATE_FORMAT]),
    "uneven counter": (_uneven_counter, ["<param group 1 with skipped=2>", "the same non-negative int 'skipped'"]),
    "negative counter": (_negative_counter, ["<param group 0 with skipped=-1>"]),
}


@pytest.mark.parametrize("case", BAD)
def test_untagged_or_inconsistent_states_are_refused_and_change_nothing(case):
    spoil, parts = BAD[case]
    sd = _tagged_state()
    spoil(sd)
    model = make_mlp(seed=2)
    opt = _optimizer(model)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    msg = str(err.value)
    assert msg.startswith("state_dict=") and " is invalid: expected " in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    after = opt.state_dict()
    assert [{k: v for k, v in g.items()} for g in after["param_groups"]] == before["param_groups"]
    for pid, entry in before["state"].items():
        for k, v in entry.items():
            assert same_bits(v, after["state"][pid][k]) if torch.is_tensor(v) else v == after["state"][pid][k]


def test_plain_adam_through_the_helpers_is_refused():
    x, y = fixed_data()
    model = make_mlp()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_of(model, x, y).backward()
    adam.step()
    saved = get_optimizer_state_dict(model, adam)
    opt = DualOpt(model.named_parameters(), lr=0.01)
    with pytest.raises(ValueError, match="a DualOpt state dict .* state from another optimizer cannot be loaded"):
        set_optimizer_state_dict(model, opt, saved)


# ------------------------------------------------------------------ torch's load_state_dict hooks (issue 19)


def _stepped_bf16(skips: int = 0):
    w = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.bfloat16))
    opt = DualOpt([w], lr=1e-2, paradigm="finetune")
    w.grad = torch.ones_like(w)
    opt.step()
    for _ in range(skips):
        w.grad = torch.full_like(w, float("nan"))
        opt.step()
    return w, opt


def test_a_load_pre_hook_changes_what_is_loaded():
    w, opt = _stepped_bf16()
    saved = opt.state_dict()
    target = saved["state"][0]["exp_avg"] * 3

    def triple(optimizer, state_dict):
        state_dict["state"] = {0: {**state_dict["state"][0], "exp_avg": target}}

    opt.register_load_state_dict_pre_hook(triple)
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[w]["exp_avg"], target.float())
    assert opt.state[w]["exp_avg"] is not target  # a copy of the hook's tensor, in the compute dtype


def test_a_load_pre_hook_may_repair_a_dict_before_it_is_checked():
    w, opt = _stepped_bf16()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["dualopt"]  # e.g. written by a tool that drops unknown group keys

    def retag(optimizer, state_dict):
        groups = [{**g, "dualopt": STATE_FORMAT} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    opt.register_load_state_dict_pre_hook(retag)
    opt.load_state_dict(saved)
    assert opt.state[w]["step"] == 1


def test_a_load_post_hook_sees_the_final_state():
    w, opt = _stepped_bf16(skips=5)
    saved = opt.state_dict()
    fresh = DualOpt([w], lr=1e-2, paradigm="finetune")
    seen = []
    fresh.register_load_state_dict_post_hook(
        lambda optimizer: seen.append((optimizer.state[w]["exp_avg"].dtype, optimizer.state[w]["anchor"].dtype,
                                       optimizer.skipped)))
    fresh.load_state_dict(saved)
    assert seen == [(torch.float32, torch.float32, 5)]
    assert fresh._optimizer_load_state_dict_pre_hooks == {} and len(fresh._optimizer_load_state_dict_post_hooks) == 1


def test_hooks_run_once_each_and_in_order():
    w, opt = _stepped_bf16()
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre 1"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre 0"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre 0", "pre 1", "post"]
