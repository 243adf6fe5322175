"""DualOpt inside the torch training machinery: lr schedulers, GradScaler, gradient clipping, torch.compile.

Every test trains the float64 MLP of ``_torch_helpers`` closed-loop, records what the
optimizer was fed at every step (gradients as ``step()`` saw them, the groups' ``lr``,
``betas`` and ``momentum`` as the scheduler left them), and replays exactly that through
the core (:func:`decoupled_core.step_tensor`). The reference path (``foreach=False``) and
the SGD fast path must give the core's bits at every step; the fast Adam path must stay
within ``conformance.tolerances.FAST_PATH_TOLERANCE``. Where a native optimizer defines the
expected values (the schedule a scheduler produces), they are compared too.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import decoupled_core as dc  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

from tests.torch._torch_helpers import (  # noqa: E402
    ScaledTracker, assert_same_bits, core_step, fixed_data, loss_of, make_mlp, same_bits)

STEPS = 60
PATHS = [pytest.param(False, id="reference"), pytest.param(True, id="fast")]


class Recorder:
    """What ``step()`` was fed, step by step: gradients and each group's hyperparameters."""

    def __init__(self, opt: DualOpt) -> None:
        self.opt = opt
        self.grads: list[list[torch.Tensor | None]] = []
        self.groups: list[list[dict]] = []
        self.after: list[list[torch.Tensor]] = []

    def before_step(self) -> None:
        self.grads.append([None if p.grad is None else p.grad.clone() for g in self.opt.param_groups
                           for p in g["params"]])
        self.groups.append([{k: g[k] for k in ("lr", "betas", "momentum")} for g in self.opt.param_groups])

    def after_step(self) -> None:
        self.after.append([p.detach().clone() for g in self.opt.param_groups for p in g["params"]])


def replay_in_core(rec: Recorder, initial: list[torch.Tensor], *, exact: bool) -> None:
    """Feed the recorded gradients and hyperparameters to the core; compare after every step."""
    opt = rec.opt
    members = [(gi, g) for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
    base = []
    for gi, g in members:
        kw = dict(direction=g["direction"], eps=g["eps"], nesterov=g["nesterov"], paradigm=g["paradigm"],
                  weight_decay=g["weight_decay"], rollback_max=g["rollback_max"], rollback_min=g["rollback_min"],
                  rollback_power=g["rollback_power"])
        base.append((gi, kw))
    rates = list(opt.layer_rates().values())
    params = [p.clone() for p in initial]
    states = [dc.init_direction_state(p, kw["direction"], xp=None) for p, (_, kw) in zip(params, base)]
    anchors = [p.clone() if kw["paradigm"] == "finetune" else None for p, (_, kw) in zip(params, base)]
    steps = [0] * len(params)
    tracker = ScaledTracker(initial)
    for t, (grads, groups, after) in enumerate(zip(rec.grads, rec.groups, rec.after), start=1):
        hps = []
        for gi, kw in base:
            g = groups[gi]
            hps.append(dc.HyperParams(beta1=g["betas"][0], beta2=g["betas"][1], momentum=g["momentum"], **kw))
        lrs = {groups[gi]["lr"] for gi, _ in base}
        assert len(lrs) == 1, "one learning rate for every group in these tests"
        core_step(params, grads, states, anchors, steps, hps=hps, rates=rates, lr=lrs.pop())
        if exact:
            for i, (p, r) in enumerate(zip(after, params)):
                assert_same_bits(p, r, f"step {t} tensor {i}")
        else:
            tracker.check(after, params, t, f"step {t}")


def _initial(seed: int = 0) -> list[torch.Tensor]:
    return [p.detach().clone() for p in make_mlp(seed).parameters()]


def _train(opt_kw: dict, make_scheduler, steps: int = STEPS, *, native: type | None = None, native_kw=None):
    """DualOpt and (optionally) a native torch optimizer driven by the same scheduler, side by side.

    Returns the recorder and the native optimizer's hyperparameters before every step."""
    model = make_mlp()
    opt = DualOpt(model.named_parameters(), **opt_kw)
    sched = make_scheduler(opt)
    rec = Recorder(opt)
    native_groups = []
    if native is not None:
        twin = native([torch.nn.Parameter(p.clone()) for p in _initial()], **native_kw)
        twin_sched = make_scheduler(twin)
    x, y = fixed_data()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        rec.before_step()
        opt.step()
        rec.after_step()
        sched.step()
        if native is not None:
            native_groups.append({k: twin.param_groups[0].get(k) for k in ("lr", "betas", "momentum")})
            twin.step()  # no gradients: nothing moves, but OneCycleLR requires a step before its own
            twin_sched.step()
    return rec, native_groups


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t / 10.0)),
}


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("paradigm", ["scratch", "finetune"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_scheduler_values_match_core(name, paradigm, foreach):
    lr0 = 0.02
    rec, _ = _train(dict(lr=lr0, paradigm=paradigm, weight_decay=0.5, foreach=foreach), SCHEDULERS[name])
    lrs = [groups[0]["lr"] for groups in rec.groups]
    if name == "StepLR":
        assert lrs == [lr0 * 0.5 ** (t // 20) for t in range(STEPS)]
    else:
        assert all(math.isclose(lr, lr0 / (1.0 + t / 10.0), rel_tol=1e-15) for t, lr in enumerate(lrs))
    # The rollback schedule keeps kappa_max = 0.01 / lr at construction (spec section 2), whatever the scheduler does.
    if paradigm == "finetune":
        assert rec.opt.param_groups[0]["rollback_max"] == 0.01 / lr0
    replay_in_core(rec, _initial(), exact=not foreach)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("paradigm", ["scratch", "finetune"])
@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_one_cycle_lr_cycles_momentum_like_native(direction, paradigm, foreach):
    """OneCycleLR(cycle_momentum=True) needs ``betas`` (Adam) or ``momentum`` (SGD) in the defaults;
    it must drive DualOpt exactly as it drives torch.optim.Adam / SGD, and the core fed those
    values reproduces the trajectory."""
    make = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=0.05, total_steps=STEPS, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95)
    kw = dict(lr=0.01, direction=direction, paradigm=paradigm, weight_decay=0.5, foreach=foreach)
    if direction == "adam":
        native, native_kw = torch.optim.Adam, dict(lr=0.01)
        assert "betas" in DualOpt([torch.nn.Parameter(torch.zeros(1))], **kw).defaults
    else:
        native, native_kw = torch.optim.SGD, dict(lr=0.01, momentum=0.9)
        d = DualOpt([torch.nn.Parameter(torch.zeros(1))], **kw).defaults
        assert "momentum" in d and "betas" not in d  # so OneCycleLR cycles momentum, not an unused beta1
    rec, native_groups = _train(kw, make, native=native, native_kw=native_kw)
    ours = [groups[0] for groups in rec.groups]
    assert [g["lr"] for g in ours] == [g["lr"] for g in native_groups]
    if direction == "adam":
        cycled = [g["betas"][0] for g in ours]
        assert cycled == [g["betas"][0] for g in native_groups]
        assert {g["betas"][1] for g in ours} == {0.999}
    else:
        cycled = [g["momentum"] for g in ours]
        assert cycled == [g["momentum"] for g in native_groups]
    lrs = [g["lr"] for g in ours]
    peak = lrs.index(max(lrs))
    assert 0 < peak < STEPS - 1 and math.isclose(max(lrs), 0.05, rel_tol=1e-3)
    assert cycled[0] == 0.95 and min(cycled) == pytest.approx(0.8, abs=1e-3)  # momentum falls while lr rises
    replay_in_core(rec, _initial(), exact=not foreach or direction == "sgd")


@pytest.mark.parametrize("foreach", PATHS)
def test_grad_scaler_unscales_and_skips_inf_steps(foreach):
    """torch.amp.GradScaler: scaled backward, unscale_, clipping, step (skipped when a gradient is
    inf), update. With a power-of-two scale the unscaled gradients are exact, so the run equals
    the plain loop bit for bit, the inf step changing nothing."""
    x, y = fixed_data()
    bad = {7, 8, 30}

    def run(with_scaler: bool):
        model = make_mlp()
        opt = DualOpt(model.parameters(), lr=0.02, paradigm="finetune", foreach=foreach)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5) if with_scaler else None
        rec = Recorder(opt)
        scales = []
        for t in range(40):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            if scaler is None:
                if t in bad:
                    continue  # the plain loop simply has no such step
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
                rec.before_step()
                opt.step()
                rec.after_step()
                continue
            scaler.scale(loss).backward()
            if t in bad:
                next(model.parameters()).grad[0, 0] = math.inf  # an overflow in the scaled backward
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
            before = [p.detach().clone() for p in model.parameters()]
            if t not in bad:
                rec.before_step()
            scaler.step(opt)
            if t in bad:
                assert all(same_bits(p, q) for p, q in zip(model.parameters(), before))
            else:
                rec.after_step()
            scaler.update()
            scales.append(scaler.get_scale())
        return model, opt, rec, scales

    plain_model, _, _, _ = run(False)
    model, opt, rec, scales = run(True)
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert_same_bits(p, q, "GradScaler run vs plain run")
    assert opt.skipped == 0  # GradScaler skipped the inf steps itself; DualOpt's counter is for its own checks
    assert all(opt.state[p]["step"] == 40 - len(bad) for p in model.parameters())
    assert scales[7] == scales[6] / 2 and scales[8] == scales[6] / 4 and scales[30] == scales[29] / 2  # halved
    assert max(scales) > 2.0 ** 12  # and grown again after growth_interval clean steps
    replay_in_core(rec, _initial(), exact=not foreach)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_gradient_clipping(clip, foreach):
    model = make_mlp()
    opt = DualOpt(model.parameters(), lr=0.05, direction="sgd", paradigm="scratch", weight_decay=0.5,
                  foreach=foreach)
    rec = Recorder(opt)
    x, y = fixed_data()
    clipped = 0
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        if clip == "norm":
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.02)
            clipped += bool(norm > 0.02)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.005)
            clipped += any(bool((g.abs() > 0.005).any()) for g in raw)
        for g, p in zip(raw, model.parameters()):
            assert bool((p.grad.abs() <= g.abs()).all())
        rec.before_step()
        opt.step()
        rec.after_step()
    assert clipped > STEPS // 2  # the clipping was active
    replay_in_core(rec, _initial(), exact=True)  # SGD: both paths are bitwise


def _compiled_run(foreach: bool, backend: str, steps: int):
    model = make_mlp()
    opt = DualOpt(model.parameters(), lr=0.02, paradigm="finetune", foreach=foreach)
    rec = Recorder(opt)
    x, y = fixed_data()

    @torch.compile(backend=backend)
    def train_step(x, y):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        return loss

    losses = []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        losses.append(float(train_step(x, y).detach()))
        # Recorded after the call: step() ran inside it and left the gradients it used in place.
        rec.grads.append([p.grad.clone() for p in model.parameters()])
        rec.groups.append([{k: g[k] for k in ("lr", "betas", "momentum")} for g in opt.param_groups])
        rec.after.append([p.detach().clone() for p in model.parameters()])
        assert not all(same_bits(p, q) for p, q in zip(model.parameters(), before))
    return model, opt, rec, losses


def _eager_run(foreach: bool, steps: int):
    model = make_mlp()
    opt = DualOpt(model.parameters(), lr=0.02, paradigm="finetune", foreach=foreach)
    x, y = fixed_data()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("foreach", PATHS)
def test_torch_compile_of_a_training_step(foreach):
    """``torch.compile`` of a step that calls ``opt.step()``: dynamo traces the model and the
    optimizer step (the core's rule with the step count as a device tensor, so the bias
    corrections round differently from the host's: not bitwise). ``aot_eager`` traces forward
    and backward through AOTAutograd without code generation, so this test stays fast."""
    torch._dynamo.reset()
    model, opt, rec, losses = _compiled_run(foreach, "aot_eager", 25)
    assert losses[-1] < losses[0]
    replay_in_core(rec, _initial(), exact=False)
    eager = _eager_run(foreach, 25)
    for p, q in zip(model.parameters(), eager.parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-12  # AOTAutograd's decompositions may reorder float64 sums
    assert all(opt.state[p]["step"] == 25 for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_inductor_training_step():
    """The same with the default (inductor) backend, which generates and compiles C++ (slow on CI)."""
    torch._dynamo.reset()
    model, opt, rec, losses = _compiled_run(True, "inductor", 10)
    replay_in_core(rec, _initial(), exact=False)
    eager = _eager_run(True, 10)
    for p, q in zip(model.parameters(), eager.parameters()):
        assert float((p - q).detach().abs().max()) <= 1e-12


def test_compiling_step_itself_traces_the_core_rule():
    """``torch.compile(opt.step)`` (seen in the wild): the step is traced (the core's rule, see
    ``_kernels.loop_update(traced=True)``) and follows the eager reference loop to float64 rounding."""
    torch._dynamo.reset()
    a, b = make_mlp(), make_mlp()
    opt_a = DualOpt(a.parameters(), lr=0.02, paradigm="finetune", foreach=False)
    opt_b = DualOpt(b.parameters(), lr=0.02, paradigm="finetune")
    step_b = torch.compile(opt_b.step, backend="eager")
    x, y = fixed_data()
    for _ in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            loss_of(m, x, y).backward()
        opt_a.step()
        step_b()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
