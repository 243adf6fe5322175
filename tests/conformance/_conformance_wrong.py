"""A deliberately wrong DualOpt: the pull acts on theta instead of the pre-weight theta-hat.

``theta <- theta_hat - c * (theta - a)`` instead of ``theta_hat - c * (theta_hat - a)``
(the mistake OLOR's SGD variant makes on purpose, spec section 9). Everything
else is the core's own code, so only the pull differs. The conformance tests
use it to show that the suite catches a wrong rule; it is importable as
``_conformance_wrong:replay_wrong`` for ``python -m dualopt.conformance --replay``.
"""

from __future__ import annotations

import numpy as np

from decoupled_core import (adam_coefficients, adam_pre_weight, all_finite, init_direction_state, layer_rates,
                            pull_coefficient, sgd_pre_weight)
from dualopt.spec.vectors import Case


def replay_wrong(case: Case) -> list[dict[str, np.ndarray]]:
    names = case.names
    hps = [case.hp(n) for n in names]
    rates = layer_rates(hps, case.layer_index)
    params = [case.initial[n].copy() for n in names]
    states = [init_direction_state(p, hp.direction, xp=np) for p, hp in zip(params, hps)]
    anchors = [case.anchor.get(n) for n in names]
    counts = [0] * len(names)
    out = []
    for grads, lr in zip(case.grads, case.lr):
        gs = [grads[n] for n in names]
        if case.nonfinite != "skip" or all_finite(gs, xp=np):
            for i, (g, hp) in enumerate(zip(gs, hps)):
                if g is None:
                    continue
                counts[i] += 1
                theta = params[i]
                if hp.direction == "adam":
                    co = adam_coefficients(lr, hp.beta1, hp.beta2, counts[i])
                    pre, states[i] = adam_pre_weight(theta, g, states[i], beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                                                     step_size=co.step_size, inv_sqrt_bc2=co.inv_sqrt_bc2, xp=np)
                else:
                    pre, states[i] = sgd_pre_weight(theta, g, states[i], lr=lr, momentum=hp.momentum,
                                                    nesterov=hp.nesterov, xp=np)
                c = pull_coefficient(lr, rates[i])
                anchor = anchors[i] if hp.paradigm == "finetune" else np.zeros_like(theta)
                params[i] = (pre - theta.dtype.type(c) * (theta - anchor)).astype(theta.dtype)  # WRONG on purpose
        out.append({n: p.copy() for n, p in zip(names, params)})
    return out


# Hostile or broken ports, each importable as ``_conformance_wrong:<name>`` for ``--replay``. Apart from the
# flaw each is named for, they return the reference trajectory, so every other case must still pass.

def _reference(case: Case) -> list[dict[str, np.ndarray]]:
    from dualopt.conformance.impl_core import replay_reference

    return replay_reference(case)


def replay_exit(case: Case) -> list[dict[str, np.ndarray]]:
    """Ends the process it runs in, on every case."""
    import sys

    sys.exit(0)


def replay_in_place(case: Case) -> list[dict[str, np.ndarray]]:
    """A correct port that steps the case's own arrays in place (initial ends as the last step's values)."""
    traj = _reference(case)
    for name in case.names:
        case.initial[name][...] = traj[-1][name]
    for step in case.grads:
        for g in step.values():
            if g is not None:
                g[...] = 0
    return traj


def replay_zeros_cheat(case: Case) -> list[dict[str, np.ndarray]]:
    """Returns zeros after overwriting ``case.expected`` with zeros."""
    zeros = [{n: np.zeros_like(a) for n, a in step.items()} for step in case.expected]
    for step in case.expected:
        for a in step.values():
            a[...] = 0
    return zeros


def replay_hang(case: Case) -> list[dict[str, np.ndarray]]:
    """Hangs on ``adam_none``; correct elsewhere."""
    import time

    if case.name == "adam_none":
        time.sleep(3600)
    return _reference(case)


def replay_crash(case: Case) -> list[dict[str, np.ndarray]]:
    """Kills its own process (no exception, no cleanup) on ``sgd_scratch``; correct elsewhere."""
    import os

    if case.name == "sgd_scratch":
        os._exit(3)
    return _reference(case)


def replay_wrong_shape(case: Case) -> list[dict[str, np.ndarray]]:
    """Returns every tensor flattened."""
    return [{n: a.reshape(-1) for n, a in step.items()} for step in _reference(case)]


def replay_not_arrays(case: Case) -> object:
    """Returns something that is not a trajectory at all."""
    return {"steps": "many"}
