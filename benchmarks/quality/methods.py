"""The optimisers compared in the quality benchmarks, built the same way for every run.

Fine-tuning (pretrained backbone, re-initialised head; every method's head gets
weight decay ``HEAD_WEIGHT_DECAY``):

- ``adamw``: torch AdamW on everything, ``weight_decay=HEAD_WEIGHT_DECAY`` (torch's default).
- ``l2sp``: AdamW (no decay on the backbone) plus the L2-SP penalty
  ``alpha/2 * ||theta_backbone - theta_0||^2`` added to the loss (Li et al. 2018).
- ``probe``: linear probe, backbone frozen, AdamW on the head.
- ``dualopt``: ``DualOpt.for_finetuning``: backbone in the finetune paradigm
  (rollback towards the pretrained weights, shallowest layer pulled hardest,
  the deepest not at all), head in the scratch paradigm. ``value`` is
  ``lr * rollback_max``, the fraction of the way back to the anchor that the
  shallowest layer moves per step at the base learning rate (OLOR's default is
  0.01). ``layers=None`` is DualOpt's default and OLOR's convention: every
  tensor is its own layer (7 backbone layers here); ``layers="module"`` makes
  weight and bias of a module one layer (4 backbone layers, so the last hidden
  layer, bias *and* weight, gets no pull).

From scratch (every parameter decayed; ``value`` is lambda):

- ``adamw_scratch``: torch AdamW, ``weight_decay=value``.
- ``dualopt_scratch``: DualOpt, ``paradigm="scratch"``, ``weight_decay=value``
  (real-time layer-wise decay: layer ``l`` of ``L`` decays at ``value*(l+1)/L``;
  default layers, one per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model import CharMLP

__all__ = ["HEAD_WEIGHT_DECAY", "Method", "build"]

HEAD_WEIGHT_DECAY = 1e-2


@dataclass(frozen=True)
class Method:
    kind: str
    value: float | None = None
    layers: str | None = None  # DualOpt's layer_index: None (one layer per tensor) or "module"

    @property
    def label(self) -> str:
        v = self.value
        labels = {
            "adamw": lambda: "AdamW (full fine-tuning)",
            "l2sp": lambda: f"AdamW + L2-SP a={v:g}",
            "probe": lambda: "Linear probe (frozen backbone)",
            "dualopt": lambda: f"DualOpt finetune lr*k_max={v:g}" + (", per-module layers" if self.layers else ""),
            "adamw_scratch": lambda: f"AdamW wd={v:g}",
            "dualopt_scratch": lambda: f"DualOpt scratch wd={v:g}",
        }
        return labels[self.kind]()

def build(method: Method, model: CharMLP, lr: float) -> tuple[torch.optim.Optimizer, Callable[[], torch.Tensor] | None]:
    """Optimizer (and loss penalty, for L2-SP) for ``model``, whose pretrained weights are already loaded."""
    k, v = method.kind, method.value
    if k == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=HEAD_WEIGHT_DECAY), None
    if k == "l2sp":
        backbone = model.backbone_parameters()
        anchors = [p.detach().clone() for p in backbone]
        opt = torch.optim.AdamW([{"params": backbone, "weight_decay": 0.0},
                                 {"params": model.head_parameters(), "weight_decay": HEAD_WEIGHT_DECAY}], lr=lr)

        def penalty() -> torch.Tensor:
            return 0.5 * v * sum(((p - a) ** 2).sum() for p, a in zip(backbone, anchors))

        return opt, penalty
    if k == "probe":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
        return torch.optim.AdamW(model.head_parameters(), lr=lr, weight_decay=HEAD_WEIGHT_DECAY), None
    from dualopt.torch import DualOpt

    if k == "dualopt":
        return DualOpt.for_finetuning(model, head="head", lr=lr, layer_index=method.layers, rollback_max=v / lr,
                                      head_weight_decay=HEAD_WEIGHT_DECAY), None
    if k == "adamw_scratch":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=v), None
    if k == "dualopt_scratch":
        return DualOpt(model.parameters(), lr=lr, paradigm="scratch", weight_decay=v,
                       layer_index=method.layers), None
    raise ValueError(f"unknown method kind {k!r}")
