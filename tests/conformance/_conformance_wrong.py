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
