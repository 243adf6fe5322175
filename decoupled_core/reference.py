"""A whole optimizer written directly on the rule: the reference every adapter is checked against.

It holds a flat list of tensors, each with its group's :class:`HyperParams`,
and applies the spec's multi-tensor semantics: layer numbering per paradigm,
per-tensor step counts, and the non-finite gradient policy.
"""

from __future__ import annotations

from typing import Any, Sequence

from ._xp import compute_dtype, namespace_of
from .hyperparams import HyperParams, resolve_rollback_max, validate
from .layers import layer_rates
from .rule import all_finite, init_anchor, init_direction_state, step_tensor

__all__ = ["ReferenceOptimizer"]


class ReferenceOptimizer:
    """DualOpt over a list of arrays of any Array API namespace.

    Parameters
    ----------
    params : sequence of arrays
        The tensors, in the order that defines default layer numbering.
    hps : sequence of HyperParams
        One per tensor (tensors of one group share an instance).
    base_lr : float, optional
        eta_0, used to resolve ``rollback_max=None`` and to check the pull bound.
    layer_index : sequence of int, optional
        Layer keys, see :func:`decoupled_core.layers.number_layers`.
    anchors : sequence of arrays or None, optional
        Finetune anchors; ``None`` (or a ``None`` entry) snapshots the tensor.
    nonfinite : {"skip", "propagate"}
        ``"skip"``: a step whose gradients hold any NaN/Inf changes nothing
        and increments :attr:`skipped`.

    Examples
    --------
    >>> import numpy as np
    >>> opt = ReferenceOptimizer([np.ones(2)], [HyperParams(paradigm="finetune")], base_lr=0.1)
    >>> opt.step([np.array([1.0, -1.0])], lr=0.1)
    True
    >>> np.round(opt.params[0], 6).tolist()
    [0.901, 1.099]
    """

    def __init__(self, params: Sequence[Any], hps: Sequence[HyperParams], *, base_lr: float | None = None,
                 layer_index: Sequence[int] | None = None, anchors: Sequence[Any] | None = None,
                 nonfinite: str = "skip", xp: Any = None) -> None:
        if len(hps) != len(params):
            raise ValueError(f"hps has {len(hps)} entries for {len(params)} params")
        self.xp = xp or namespace_of(*params)
        resolved = []
        for hp in hps:
            validate(hp, lr=base_lr, nonfinite=nonfinite)
            if hp.paradigm == "finetune":
                hp = hp.replace(rollback_max=resolve_rollback_max(hp.rollback_max, base_lr))
            resolved.append(hp)
        self.hps = resolved
        self.nonfinite = nonfinite
        self.rates = layer_rates(resolved, layer_index)
        self.params = [self.xp.asarray(p, copy=True) for p in params]
        self.states = [init_direction_state(p, hp.direction, xp=self.xp) for p, hp in zip(self.params, resolved)]
        self.steps = [0] * len(params)
        self.skipped = 0
        self.anchors: list[Any] = []
        for i, (p, hp) in enumerate(zip(self.params, resolved)):
            given = None if anchors is None else anchors[i]
            if hp.paradigm != "finetune":
                self.anchors.append(None)
            elif given is None:
                self.anchors.append(init_anchor(p, xp=self.xp))
            else:
                if tuple(given.shape) != tuple(p.shape):
                    raise ValueError(f"anchor[{i}] has shape {tuple(given.shape)}, param has {tuple(p.shape)}")
                # Straight to the compute dtype: a float32 anchor for a bfloat16
                # tensor must not be rounded through bfloat16 first (spec section 6).
                self.anchors.append(self.xp.astype(self.xp.asarray(given, copy=True), compute_dtype(p.dtype, self.xp)))

    def step(self, grads: Sequence[Any], lr: float | Sequence[float]) -> bool:
        """Apply one step; ``None`` gradients leave their tensor (and its t) alone.

        Returns False when the non-finite policy skipped the step.
        """
        if self.nonfinite == "skip" and not bool(all_finite(grads, xp=self.xp)):
            self.skipped += 1
            return False
        lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(self.params)
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.steps[i] += 1
            self.params[i], self.states[i] = step_tensor(
                self.params[i], g, self.states[i], self.anchors[i], hp=self.hps[i], lr=lrs[i],
                step=self.steps[i], rate=self.rates[i], xp=self.xp)
        return True
