"""OLOR as a user would write it from the paper: plain torch, one tensor at a time.

This is the baseline that ``dualopt.torch.DualOpt(paradigm="finetune")`` is
timed against in :mod:`floor_memory` (no fusing, no ``foreach``, no care about
temporaries). Per tensor ``i`` of the pretrained model, at step ``t``::

    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
    u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)    # bias-corrected Adam direction
    pre = theta - lr*u                                   # the pre-weight
    theta = pre - lr*kappa_i*(pre - theta_0)             # rollback towards the snapshot

with ``kappa_i = kappa_min + (1 - i/(n-1))**p * (kappa_max - kappa_min)`` over the
tensors in parameter order and ``theta_0`` a snapshot taken at construction.
``anchor=False`` turns the last line into the scratch paradigm's "pre-weight
decay" ``theta = pre - lr*rho_i*pre`` (LPWD with ``rho_i = lambda*(i+1)/n``),
again written the obvious way.

It is mathematically the DualOpt rule (the order of floating-point operations
differs, so results agree to rounding, not bitwise); :func:`check_against` in
``floor_memory.py`` verifies that before anything is timed.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["NaiveOLOR", "olor_kappas", "lpwd_rates"]


def olor_kappas(n: int, kappa_max: float, kappa_min: float = 0.0, power: float = 1.0) -> list[float]:
    """OLOR's per-tensor rollback rates, shallowest (index 0) first.

    Examples
    --------
    >>> olor_kappas(3, 10.0)
    [10.0, 5.0, 0.0]
    """
    if n == 1:
        return [kappa_max]
    return [kappa_min + (1 - i / (n - 1)) ** power * (kappa_max - kappa_min) for i in range(n)]


def lpwd_rates(n: int, weight_decay: float) -> list[float]:
    """LPWD's per-tensor decay rates: ``weight_decay * (i+1)/n``; deepest decays most.

    Examples
    --------
    >>> lpwd_rates(2, 0.5)
    [0.25, 0.5]
    """
    return [weight_decay * (i + 1) / n for i in range(n)]


class NaiveOLOR(torch.optim.Optimizer):
    """Adam direction + pull, per tensor, in plain torch (single param group).

    Parameters
    ----------
    params : iterable of tensors
    rates : list of float
        One pull rate per tensor (``olor_kappas`` or ``lpwd_rates``).
    anchor : bool
        True: pull towards a snapshot of the initial weights (OLOR).
        False: pull towards zero (LPWD, "pre-weight decay").
    anchor_dtype : torch.dtype, optional
        Store the snapshot in this dtype (e.g. ``torch.bfloat16``, to measure
        what a 2-byte anchor saves); default: the parameter's dtype. The pull
        is computed in the parameter's dtype either way.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = NaiveOLOR([w], rates=[1.0], lr=0.1)  # pre = 0.9, pulled 10% back to 1
    >>> w.grad = torch.tensor([1.0, -1.0]); opt.step()
    >>> [round(x, 6) for x in w.tolist()]
    [0.91, 1.09]
    """

    def __init__(self, params: Iterable[torch.Tensor], rates: list[float], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, anchor: bool = True,
                 anchor_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        ps = self.param_groups[0]["params"]
        if len(rates) != len(ps):
            raise ValueError(f"rates has {len(rates)} entries for {len(ps)} parameters")
        self.rates = list(rates)
        self.use_anchor = anchor
        for p in ps:
            st = self.state[p]
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            if anchor:
                st["anchor"] = p.detach().to(dtype=anchor_dtype or p.dtype, copy=True)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim API
        group = self.param_groups[0]
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        for p, rate in zip(group["params"], self.rates):
            if p.grad is None:
                continue
            g = p.grad
            st = self.state[p]
            st["step"] += 1
            t = st["step"]
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            pre = p - lr * u
            if self.use_anchor:
                p.copy_(pre - lr * rate * (pre - st["anchor"]))
            else:
                p.copy_(pre - lr * rate * pre)
        return None
