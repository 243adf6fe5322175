"""With every pull rate at zero the rule is torch.optim.Adam / torch.optim.SGD (spec section 10).

Closed loop over hundreds of steps in float64: each optimizer computes the
gradient of the same quadratic from its own weights, so any difference feeds
back. The tolerance is float64 round-off: torch evaluates sqrt(v)/sqrt(bc2) by
division and fuses theta + alpha*u, the core multiplies by host reciprocals and
does not fuse, so they agree to a few ulps per step, not bitwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import decoupled_core as dc
from decoupled_core import HyperParams

torch = pytest.importorskip("torch")

STEPS = 300
SHAPES = [(8, 5), (5,), (5, 3), ()]
# Per-step agreement. Measured here (torch 2.13 CPU, weights O(1)): the largest absolute
# difference over 300 steps is 4e-16 (Adam) to 1.3e-15 (SGD), i.e. a few ulps; WORST leaves 100x.
RTOL = 1e-12
ATOL = 1e-14
WORST = 1e-13

# Three ways to make every rho zero: no pull, scratch with lambda = 0, finetune with kappa = 0.
ZERO_PULL = {
    "none": dict(paradigm="none"),
    "scratch-wd0": dict(paradigm="scratch", weight_decay=0.0),
    "finetune-k0": dict(paradigm="finetune", rollback_max=0.0, rollback_min=0.0),
}


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in SHAPES]
    curvature = [rng.uniform(0.1, 3.0, s) for s in SHAPES]
    target = [rng.standard_normal(s) for s in SHAPES]
    noise = [[0.1 * rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]
    return init, curvature, target, noise


def grads_of(params, curvature, target, noise_t):
    # Gradient of sum(h * (theta - target)**2 / 2), plus fixed per-step noise.
    return [np.asarray(h * (p - c) + n) for p, h, c, n in zip(params, curvature, target, noise_t)]


def learning_rate(t: int, base: float) -> float:
    return base * (0.55 + 0.45 * math.cos(math.pi * t / STEPS))  # a schedule: eta changes every step


def run_both(torch_optimizer, hp: HyperParams, base_lr: float):
    init, curvature, target, noise = problem()
    core = dc.ReferenceOptimizer([p.copy() for p in init], [hp] * len(init), base_lr=base_lr, xp=np)
    tparams = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in init]
    opt = torch_optimizer(tparams, base_lr)
    worst = 0.0
    for t in range(1, STEPS + 1):
        lr = learning_rate(t, base_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        tgrads = grads_of([p.detach().numpy() for p in tparams], curvature, target, noise[t - 1])
        for p, g in zip(tparams, tgrads):
            p.grad = torch.from_numpy(g)
        opt.step()
        core.step(grads_of(core.params, curvature, target, noise[t - 1]), lr)
        for got, ref in zip(core.params, tparams):
            ref = ref.detach().numpy()
            np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=f"step {t}")
            worst = max(worst, float(np.max(np.abs(got - ref), initial=0.0)))
    return core, tparams, worst


@pytest.mark.parametrize("zero", ZERO_PULL.values(), ids=ZERO_PULL.keys())
def test_zero_pull_is_torch_adam(zero):
    hp = HyperParams(beta1=0.85, beta2=0.995, eps=1e-7, **zero)
    core, tparams, worst = run_both(
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=0.0),
        hp, base_lr=0.05)
    assert core.rates == [0.0] * len(SHAPES)
    # The trajectories really moved (the comparison is not between two frozen copies).
    init, *_ = problem()
    assert all(np.max(np.abs(p - i), initial=1.0) > 0.1 for p, i in zip(core.params, init))
    assert worst < WORST


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.9, True), (0.0, False), (0.5, True)])
@pytest.mark.parametrize("zero", ZERO_PULL.values(), ids=ZERO_PULL.keys())
def test_zero_pull_is_torch_sgd(zero, momentum, nesterov):
    hp = HyperParams(direction="sgd", momentum=momentum, nesterov=nesterov, **zero)
    core, tparams, worst = run_both(
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                                       weight_decay=0.0),
        hp, base_lr=0.02)
    init, *_ = problem()
    assert all(np.max(np.abs(p - i), initial=1.0) > 0.1 for p, i in zip(core.params, init))
    assert worst < WORST
