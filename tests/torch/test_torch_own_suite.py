"""torch.optim's generic optimizer checks, driven from torch's own ``OptimizerInfo`` description of DualOpt.

Torch ships ``torch.testing._internal.common_optimizers`` (``OptimizerInfo``,
``OptimizerInput``, ``ErrorOptimizerInput``, ``optim_db``, the error inputs
every optimizer must reject); its driver, ``test/test_optim.py``
(``TestOptimRenewed``), lives only in the pytorch repository. ``DUALOPT_INFO``
below describes DualOpt in torch's terms (inputs, error inputs, supported
impls, schedulers) and the tests here are a harness written for this project
that runs the same generic checks over it: errors, direction of travel,
foreach vs for-loop, state_dict round trips (and a dtype change), closures,
param groups, complex params, ``zero_grad``, ``maximize``, no autograd graph
(``differentiable=False``), LR schedulers, deepcopy, pickling, the step and
state_dict hooks, and empty params. Trajectories are compared in float64.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch.testing._internal imports expecttest, pinned in "
                    "requirements-lock.txt: run make setup")
common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau, StepLR  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

from dualopt.torch import DualOpt  # noqa: E402


def optim_inputs_func_dualopt(device: Any, dtype: Any = None) -> list[OptimizerInput]:
    """Constructor kwargs (no params) covering both directions, the three paradigms, maximize and a Tensor lr."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default: adam, scratch"),
        OptimizerInput(params=None, kwargs={"lr": 0.02, "paradigm": "finetune"}, desc="adam finetune"),
        OptimizerInput(params=None, kwargs={"lr": 0.02, "paradigm": "none", "maximize": True},
                       desc="adam none maximize"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01), "paradigm": "finetune", "rollback_max": 0.5},
                       desc="Tensor lr, finetune"),
        OptimizerInput(params=None, kwargs={"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
                       desc="adam scratch, non-default betas"),
        OptimizerInput(params=None, kwargs={"lr": 0.02, "direction": "sgd", "nesterov": True},
                       desc="sgd nesterov scratch"),
        OptimizerInput(params=None, kwargs={"lr": 0.02, "direction": "sgd", "momentum": 0.0,
                                            "paradigm": "finetune"}, desc="sgd finetune, no momentum"),
        OptimizerInput(params=None, kwargs={"lr": 0.02, "direction": "sgd", "paradigm": "none", "maximize": True},
                       desc="sgd none maximize"),
    ]


def optim_error_inputs_func_dualopt(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    """torch's error inputs for every optimizer, then DualOpt's own (spec wording: ``<name>=<value> is invalid``)."""
    inputs = []
    for err in get_error_inputs_for_all_optims(device, dtype):
        if err.optimizer_error_input.desc == "Tensor lr must be 1-element":
            # Same input and error class; DualOpt words every bad hyperparameter in the spec's one form.
            err = ErrorOptimizerInput(err.optimizer_error_input, error_type=ValueError,
                                      error_regex=r"lr=.* is invalid: expected .*one element")
        inputs.append(err)
    return inputs + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"lr": -1e-2}, desc="negative lr"),
                            error_type=ValueError, error_regex="lr=-0.01 is invalid"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"betas": (1.0, 0.999)}, desc="beta1 of 1"),
                            error_type=ValueError, error_regex="is invalid"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"eps": -1.0}, desc="negative eps"),
                            error_type=ValueError, error_regex="eps=-1.0 is invalid"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"direction": "adamw"}, desc="unknown direction"),
                            error_type=ValueError, error_regex="direction='adamw' is invalid"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"paradigm": "rollback"}, desc="unknown paradigm"),
                            error_type=ValueError, error_regex="paradigm='rollback' is invalid"),
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"momentum": -0.5, "direction": "sgd"},
                                           desc="negative momentum"),
                            error_type=ValueError, error_regex="momentum=-0.5 is invalid"),
    ]


#: DualOpt described in torch's terms: only ``foreach`` among torch's global flags (no fused, capturable or
#: differentiable), real floating params only (spec section 7), dense gradients only.
DUALOPT_INFO = OptimizerInfo(
    DualOpt,
    optim_inputs_func=optim_inputs_func_dualopt,
    optim_error_inputs_func=optim_error_inputs_func_dualopt,
    scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=2)],
                      [lambda opt: OneCycleLR(opt, max_lr=0.05, total_steps=8)],
                      [lambda opt: CyclicLR(opt, base_lr=0.001, max_lr=0.05, step_size_up=2, cycle_momentum=False)],
                      [lambda opt: ReduceLROnPlateau(opt, factor=0.5, patience=0),
                       lambda opt: StepLR(opt, gamma=0.9, step_size=3)]),
    supported_impls=("foreach",),
    supports_complex=False,
    supports_sparse=False,
    has_capturable_arg=False,
    supports_fused_on=(),
)
INPUTS = DUALOPT_INFO.optim_inputs_func("cpu")
IDS = [i.desc for i in INPUTS]


def model_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.nn.Parameter]:
    """A weight and a bias (two layers of the default numbering)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype))]


def loss_fn(params: list[torch.Tensor], step: int = 0) -> torch.Tensor:
    w, b = params
    x = torch.linspace(-1.0, 1.0, 5, dtype=w.dtype) + 0.1 * step
    return ((w @ x + b - 1.0) ** 2).sum() + 0.1 * (w**2).sum()


def value(params: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(loss_fn(params))


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0,
          sign: float = 1.0) -> list[float]:
    losses = []
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = sign * loss_fn(params, t)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return losses


def make(inp: OptimizerInput, params: list[torch.Tensor], **extra: Any) -> DualOpt:
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.kwargs.items()}
    return DualOpt(params, **{**kwargs, **extra})


def clone(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("err", DUALOPT_INFO.optim_error_inputs_func("cpu", torch.float32),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_errors(err: ErrorOptimizerInput) -> None:
    oi = err.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]

    def run() -> None:
        opt = DualOpt(params, **oi.kwargs)
        if err.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            run()
    else:
        with pytest.raises(err.error_type, match=err.error_regex):
            run()


@pytest.mark.parametrize("flag", ["fused", "capturable", "differentiable"])
def test_unsupported_impls_are_refused(flag: str) -> None:
    """The impls ``DUALOPT_INFO`` leaves out are refused, not silently ignored."""
    assert flag not in DUALOPT_INFO.supported_impls
    with pytest.raises(TypeError, match=flag):
        DualOpt(model_params(), **{flag: True})


def test_empty_params() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        DualOpt([])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_are_refused(dtype: torch.dtype) -> None:
    assert not DUALOPT_INFO.supports_complex
    with pytest.raises(ValueError, match="complex"):
        DualOpt([torch.nn.Parameter(torch.randn(2, dtype=dtype))])
    opt = DualOpt(model_params())
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, dtype=dtype))]})


# ------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_goes_right_direction(inp: OptimizerInput, foreach: bool) -> None:
    params = model_params()
    opt = make(inp, params, foreach=foreach)
    sign = -1.0 if inp.kwargs.get("maximize") else 1.0  # maximize: climb -loss, i.e. still lower the loss
    before = value(params)
    train(opt, params, 12, sign=sign)
    assert value(params) < before


@pytest.mark.parametrize("sched", range(len(DUALOPT_INFO.scheduler_inputs)))
@pytest.mark.parametrize("inp", INPUTS[:2] + INPUTS[5:6], ids=[IDS[0], IDS[1], IDS[5]])
def test_goes_right_direction_with_lr_scheduler(inp: OptimizerInput, sched: int) -> None:
    """The scheduler rewrites ``group["lr"]`` (and beta1 / momentum) and DualOpt steps with it: same as by hand."""
    params, manual = model_params(), model_params()
    opt, ref = make(inp, params), make(inp, manual)
    schedulers = [f(opt) for f in DUALOPT_INFO.scheduler_inputs[sched]]
    lrs, before = [], value(params)
    for t in range(8):
        lr = opt.param_groups[0]["lr"]
        lrs.append(float(lr))
        for g, mine in zip(ref.param_groups, opt.param_groups):
            for key in ("lr", "betas", "momentum"):  # OneCycleLR also cycles beta1 / momentum
                if key in mine:
                    g[key] = mine[key]
        train(opt, params, 1, start=t)
        train(ref, manual, 1, start=t)
        for s in schedulers:
            # A flat metric: ReduceLROnPlateau (patience 0) halves the lr after every step.
            s.step(1.0) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert_same(params, manual)
    assert len(set(lrs)) > 1, lrs
    assert value(params) < before


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_foreach_matches_forloop(inp: OptimizerInput) -> None:
    a, b = model_params(), model_params()
    opt_a, opt_b = make(inp, a, foreach=False), make(inp, b, foreach=True)
    train(opt_a, a, 6)
    train(opt_b, b, 6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    for pa, pb in zip(a, b):
        for key, va in opt_a.state[pa].items():
            vb = opt_b.state[pb][key]
            if isinstance(va, torch.Tensor):
                torch.testing.assert_close(va, vb, rtol=1e-13, atol=1e-15)
            else:
                assert va == vb, key


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_step_with_closure(inp: OptimizerInput) -> None:
    params, ref_params = model_params(), model_params()
    opt, ref = make(inp, params), make(inp, ref_params)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    assert float(loss.detach()) == value(ref_params)
    train(ref, ref_params, 1)
    assert_same(params, ref_params)


def test_step_is_noop_when_params_have_no_grad() -> None:
    params = model_params()
    before = [p.detach().clone() for p in params]
    for inp in INPUTS:
        opt = make(inp, params)
        opt.step()
        assert_same(params, before)
        # DualOpt creates its state eagerly (anchors are taken at construction); no step may be counted.
        assert all(int(st.get("step", 0)) == 0 for st in opt.state.values())


def test_param_groups_with_different_settings() -> None:
    """A group with lr 0 stays put; a group with its own direction/paradigm steps as that optimizer alone."""
    w, b = model_params()
    b_alone = torch.nn.Parameter(b.detach().clone())
    w0 = w.detach().clone()
    opt = DualOpt([{"params": [w], "lr": 0.0}, {"params": [b], "direction": "sgd", "paradigm": "none",
                                                "lr": 0.05, "momentum": 0.5}], lr=0.01)
    ref = DualOpt([b_alone], direction="sgd", paradigm="none", lr=0.05, momentum=0.5)
    for t in range(4):
        train(opt, [w, b], 1, start=t)
        ref.zero_grad()
        loss_fn([w.detach(), b_alone], t).backward()
        ref.step()
    assert_same([w], [w0])
    assert_same([b], [b_alone])
    assert opt.param_groups[1]["direction"] == "sgd" and opt.param_groups[0]["direction"] == "adam"


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    params = model_params()
    opt = DualOpt(params)
    loss_fn(params).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert (p.grad is None) if set_to_none else bool((p.grad == 0).all())


@pytest.mark.parametrize("inp", [i for i in INPUTS if i.kwargs.get("maximize")], ids=lambda i: i.desc)
def test_maximize_equals_minimizing_the_negated_loss(inp: OptimizerInput) -> None:
    a, b = model_params(), model_params()
    train(make(inp, a), a, 5, sign=-1.0)  # maximize -loss
    train(make(inp, b, maximize=False), b, 5, sign=1.0)  # minimize loss
    assert_same(a, b)


@pytest.mark.parametrize("inp", INPUTS[:1] + INPUTS[5:6], ids=[IDS[0], IDS[5]])
def test_step_builds_no_autograd_graph(inp: OptimizerInput) -> None:
    """``differentiable=False`` (torch's default, DualOpt's only mode): the step runs without autograd."""
    params = model_params()
    opt = make(inp, params)
    with torch.enable_grad():
        train(opt, params, 2)
    for p in params:
        assert p.grad_fn is None and p.is_leaf
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                assert not v.requires_grad


# -------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_state_dict_round_trip(inp: OptimizerInput) -> None:
    """Save after 3 steps, load into a fresh optimizer on copied params: both continue identically."""
    a = model_params()
    opt_a = make(inp, a)
    train(opt_a, a, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    b = clone(a)
    opt_b = make(inp, b)
    opt_b.load_state_dict(sd)
    train(opt_a, a, 3, start=3)
    train(opt_b, b, 3, start=3)
    assert_same(a, b)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            if isinstance(v, torch.Tensor):
                assert_same([v], [sb["state"][k][key]])
            else:
                assert v == sb["state"][k][key]


def test_state_dict_is_deterministic() -> None:
    params = model_params()
    opt = DualOpt(params, paradigm="finetune", lr=0.02)
    train(opt, params, 2)
    s1, s2 = opt.state_dict(), opt.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        assert s1["state"][k].keys() == s2["state"][k].keys()


@pytest.mark.parametrize("inp", INPUTS[:2] + INPUTS[5:7], ids=[IDS[0], IDS[1], IDS[5], IDS[6]])
def test_load_state_dict_with_a_different_dtype(inp: OptimizerInput) -> None:
    """State saved from float64 params loads into float32 params (cast as torch.optim does) and steps on."""
    a = model_params(torch.float64)
    opt_a = make(inp, a)
    train(opt_a, a, 3)
    b = [torch.nn.Parameter(p.detach().to(torch.float32)) for p in a]
    opt_b = make(inp, b)
    opt_b.load_state_dict(opt_a.state_dict())
    for p in b:
        for key, v in opt_b.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                assert v.dtype == torch.float32, key
    train(opt_a, a, 3, start=3)
    train(opt_b, b, 3, start=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.double(), x.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_deepcopy(inp: OptimizerInput) -> None:
    params = model_params()
    opt = make(inp, params)
    train(opt, params, 2)
    dup = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(dup) if not k.startswith("_")}
    for k in public - {"state", "param_groups"}:
        assert type(getattr(dup, k)) is type(getattr(opt, k)), k
    dup_params = dup.param_groups[0]["params"] + dup.param_groups[-1]["params"][len(dup.param_groups[0]["params"]):]
    assert all(d is not p for d, p in zip(dup_params, params))
    train(dup, dup_params, 2, start=2)
    train(opt, params, 2, start=2)
    assert_same(dup_params, params)


@pytest.mark.parametrize("inp", INPUTS, ids=IDS)
def test_pickle(inp: OptimizerInput) -> None:
    params = model_params()
    opt = make(inp, params)
    train(opt, params, 2)
    back = pickle.loads(pickle.dumps(opt))
    back_params = [p for g in back.param_groups for p in g["params"]]
    assert_same(back_params, params)
    train(back, back_params, 2, start=2)
    train(opt, params, 2, start=2)
    assert_same(back_params, params)


def test_optimizer_can_be_printed() -> None:
    text = repr(DualOpt(model_params(), paradigm="finetune"))
    assert "DualOpt" in text and "finetune" in text


# -------------------------------------------------------------------------------------------- hooks


def test_step_pre_and_post_hooks() -> None:
    params = model_params()
    opt = DualOpt(params, lr=0.05)
    seen: list[tuple[str, Any]] = []

    def pre(o: Any, args: Any, kwargs: Any) -> None:
        seen.append(("pre", params[0].detach().clone()))

    def post(o: Any, args: Any, kwargs: Any) -> None:
        seen.append(("post", params[0].detach().clone()))

    h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    g_pre = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global", None)))
    try:
        train(opt, params, 2)
    finally:
        g_pre.remove()
    assert [s[0] for s in seen] == ["global", "pre", "post"] * 2
    assert not torch.equal(seen[1][1], seen[2][1])  # the step happened between pre and post
    h_pre.remove()
    h_post.remove()
    train(opt, params, 1, start=2)
    assert len(seen) == 6


def test_state_dict_pre_and_post_hooks() -> None:
    params = model_params()
    opt = DualOpt(params)
    train(opt, params, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        sd["extra"] = "kept"
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["extra"] == "kept"


def test_load_state_dict_pre_and_post_hooks() -> None:
    """A pre-hook's changes (groups and state) are what is loaded; a post-hook sees DualOpt's finished load."""
    params = model_params()
    params[1] = torch.nn.Parameter(params[1].detach().to(torch.bfloat16))
    opt = DualOpt(params, lr=0.01)
    opt.zero_grad()
    loss_fn([params[0], params[1].double()]).backward()
    opt.step()
    sd = opt.state_dict()
    fresh = DualOpt(clone(params), lr=0.01)
    seen: dict[str, Any] = {}

    def pre(o: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.005
        for st in state_dict["state"].values():
            st["exp_avg"] = st["exp_avg"] * 2
        return state_dict

    def post(o: Any) -> None:
        seen["lr"] = o.param_groups[0]["lr"]
        seen["dtypes"] = [o.state[p]["exp_avg"].dtype for p in o.param_groups[0]["params"]]

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == 0.005
    for p, q in zip(params, fresh.param_groups[0]["params"]):
        torch.testing.assert_close(fresh.state[q]["exp_avg"], 2 * opt.state[p]["exp_avg"], rtol=0, atol=0)
    # DualOpt keeps float32 moments for a bf16 param; the post-hook runs after that is restored.
    assert seen == {"lr": 0.005, "dtypes": [torch.float64, torch.float32]}


# ------------------------------------------------------------------------------- torch's own database


def test_optim_db_entries_drive_this_harness_too() -> None:
    """The harness reads only ``OptimizerInfo`` fields, so torch's own Adam entry runs it unchanged."""
    adam_info = next(i for i in common_optimizers.optim_db if i.optim_cls is torch.optim.Adam)
    inp = next(i for i in adam_info.optim_inputs_func("cpu") if not i.kwargs.get("maximize")
               and not isinstance(i.kwargs.get("lr"), torch.Tensor))
    params = model_params()
    opt = torch.optim.Adam(params, **inp.kwargs)
    before = value(params)
    train(opt, params, 12)
    assert value(params) < before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errs = [e for e in adam_info.optim_error_inputs_func("cpu", torch.float32)
                if e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR and not issubclass(e.error_type, Warning)]
    assert errs
    e = errs[0]
    with pytest.raises(e.error_type, match=e.error_regex):
        torch.optim.Adam(e.optimizer_error_input.params or model_params(), **e.optimizer_error_input.kwargs)
