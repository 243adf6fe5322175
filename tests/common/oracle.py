"""The tests' one independent reading of spec/SPEC.md: layer rates (section 3), the rule (section 4), host scalars (5).

Written from the spec's text with numpy and Python floats only; it never calls
``decoupled_core`` or ``dualopt``, so a test that compares them with this
compares two readings of the spec. Used by the core's property tests
(``tests/core/test_core_properties.py``), the committed-vector replayer
written from FORMAT.md (``tests/core/test_vector_format_replay.py``) and the
fuzz suite (``tests/common/fuzz_spec.py``, also run in the Keras subprocesses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Group:
    """One tensor's hyperparameters, under the spec's canonical names (a plain record, not the core's)."""

    direction: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    paradigm: str = "scratch"
    weight_decay: float = 0.01
    rollback_max: float = 1.0
    rollback_min: float = 0.0
    rollback_power: float = 1.0

    def core_kwargs(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def layer_rates(groups: Sequence[Any], keys: Sequence[int] | None) -> list[float]:
    """rho of every tensor (section 3): per paradigm the distinct keys are ranked (l) and counted (L).

    ``groups`` holds one record per tensor with the attributes of :class:`Group`;
    ``keys`` is the layer index of every tensor (None: the tensor's position).
    """
    paradigms = [g.paradigm for g in groups]
    keys = list(range(len(groups))) if keys is None else list(keys)
    rates = []
    for g, key in zip(groups, keys):
        distinct = sorted({k for k, p in zip(keys, paradigms) if p == g.paradigm})
        l, n = distinct.index(key), len(distinct)
        if g.paradigm == "scratch":
            rates.append(g.weight_decay * ((l + 1) / n))
        elif g.paradigm == "finetune":
            rates.append(g.rollback_max if n == 1 else
                         g.rollback_min + (1.0 - l / (n - 1)) ** g.rollback_power * (g.rollback_max - g.rollback_min))
        else:
            rates.append(0.0)
    return rates


def spec_step(theta: np.ndarray, g: np.ndarray, state: tuple, anchor: np.ndarray, *, hp: Any, lr: float, t: int,
              rho: float) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One update (sections 4 and 5) in ``theta``'s dtype: returns ``(theta, pre_weight, state)``.

    ``hp`` has the attributes of :class:`Group` (``decoupled_core.HyperParams``
    has them too). Host scalars are float64 Python values (``**`` is C ``pow``,
    ``math.sqrt`` correctly rounded), each rounded once to the array dtype where
    it meets an array; every array operation is one IEEE operation, in the
    spec's order. ``state`` is ``(m, v)`` for Adam, ``(b,)`` for SGD.
    """
    k = theta.dtype.type  # rounds a host float64 scalar to the compute dtype
    if hp.direction == "adam":
        m, v = state
        step_size = lr / (1.0 - hp.beta1 ** t)
        inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - hp.beta2 ** t)
        m = k(hp.beta1) * m + k(1.0 - hp.beta1) * g                      # 1
        v = k(hp.beta2) * v + k(1.0 - hp.beta2) * (g * g)                # 2
        d = np.sqrt(v) * k(inv_sqrt_bc2) + k(hp.eps)                     # 3
        pre = theta - k(step_size) * (m / d)                             # 4
        state = (m, v)
    else:
        (b,) = state
        b = k(hp.momentum) * b + g                                       # 1
        u = g + k(hp.momentum) * b if hp.nesterov else b                 # 2
        pre = theta - k(lr) * u                                          # 3
        state = (b,)
    c = min(max(lr * rho, 0.0), 1.0)
    if c == 0.0:
        new = pre                                                        # 4.2: skipped when c is 0
    elif hp.paradigm == "finetune":
        new = pre - k(c) * (pre - anchor)                                # 5
    else:
        new = pre - k(c) * pre                                           # 5, a = 0
    return np.asarray(new), np.asarray(pre), tuple(np.asarray(s) for s in state)
