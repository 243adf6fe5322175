"""The optimisers compared in the quality benchmarks, built the same way for every run.

Fine-tuning (pretrained backbone, re-initialised head; every method's head gets
weight decay ``HEAD_WEIGHT_DECAY``). Each *family* below has a small sweep of its
own strength knob; the benchmark selects one configuration per family on
downstream **validation** loss and reports it on **test** (``report.py``):

- ``adamw``: torch AdamW on everything, ``weight_decay=HEAD_WEIGHT_DECAY`` (torch's default).
- ``l2sp``: AdamW (no decay on the backbone) plus the L2-SP penalty
  ``alpha/2 * ||theta_backbone - theta_0||^2`` added to the loss (Li et al. 2018);
  ``value`` is alpha.
- ``probe``: linear probe, backbone frozen, AdamW on the head; the sweep is over
  the learning rate (``lr``), its only knob.
- ``dualopt``: ``DualOpt.for_finetuning``: backbone in the finetune paradigm
  (rollback towards the pretrained weights, shallowest layer pulled hardest,
  the deepest not at all), head in the scratch paradigm. ``value`` is
  ``lr * rollback_max``, the fraction of the way back to the anchor that the
  shallowest layer moves per step at the base learning rate (OLOR's default is
  0.01). ``layers=None`` is DualOpt's default and OLOR's convention: every
  tensor is its own layer (7 backbone layers here); ``layers="module"`` makes
  weight and bias of a module one layer (4 backbone layers, so the last hidden
  layer, bias *and* weight, gets no pull). The per-module runs are a variant
  shown in the tables, not part of the selection (so that DualOpt's sweep has
  as many points as L2-SP's).

  ``anchor="bfloat16"`` / ``"float16"`` *emulate* a lower-precision anchor: the
  pretrained weights are rounded to that format and passed as the (float32)
  anchor, so the run sees exactly the pull targets a 2-byte anchor would give
  (DualOpt itself has no such option; the memory it would save is measured in
  ``floor_memory.py``). These runs are never selected; they are compared with
  the float32-anchor run of the same ``value``, seed by seed.
- ``adamw_random``: reference, not a competitor: AdamW from a random
  initialisation (no pretraining), same steps, to show what pretraining buys.

From scratch (every parameter decayed; ``value`` is lambda):

- ``adamw_scratch``: torch AdamW, ``weight_decay=value`` (``value=0`` is plain Adam).
- ``dualopt_scratch``: DualOpt, ``paradigm="scratch"``, ``weight_decay=value``
  (real-time layer-wise decay: layer ``l`` of ``L`` decays at ``value*(l+1)/L``;
  default layers, one per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model import CharMLP

__all__ = ["HEAD_WEIGHT_DECAY", "Method", "build", "FAMILIES"]

HEAD_WEIGHT_DECAY = 1e-2

#: Fine-tuning families, in table order; each is selected on validation independently.
FAMILIES = {"adamw": "AdamW (full fine-tuning)", "l2sp": "AdamW + L2-SP", "probe": "Linear probe (frozen backbone)",
            "dualopt": "DualOpt finetune"}


@dataclass(frozen=True)
class Method:
    kind: str
    value: float | None = None
    layers: str | None = None  # DualOpt's layer_index: None (one layer per tensor) or "module"
    lr: float | None = None  # None: the benchmark's learning rate for this paradigm
    anchor: str = "float32"  # DualOpt finetune: "bfloat16"/"float16" emulate a rounded anchor

    @property
    def family(self) -> str | None:
        """The family this run competes in (None: a reference or emulation row, never selected)."""
        if self.kind == "dualopt" and (self.anchor != "float32" or self.layers):
            return None
        return self.kind if self.kind in FAMILIES else None

    @property
    def setting(self) -> str:
        """The swept knob of this run, for tables (e.g. ``alpha=0.01``)."""
        v = self.value
        if self.kind == "l2sp":
            return f"alpha={v:g}"
        if self.kind == "probe":
            return f"lr={self.lr:g}" if self.lr else "default lr"
        if self.kind == "dualopt":
            return (f"lr*k_max={v:g}" + (", per-module layers" if self.layers else "")
                    + (f", {self.anchor} anchor" if self.anchor != "float32" else ""))
        if self.kind in ("adamw_scratch", "dualopt_scratch"):
            return f"wd={v:g}"
        return ""

    @property
    def label(self) -> str:
        names = {"adamw": "AdamW (full fine-tuning)", "l2sp": "AdamW + L2-SP", "probe": "Linear probe (frozen backbone)",
                 "dualopt": "DualOpt finetune", "adamw_random": "AdamW from random init (no pretraining)",
                 "adamw_scratch": "AdamW", "dualopt_scratch": "DualOpt scratch"}
        return names[self.kind] + (f" {self.setting}" if self.setting else "")


def rounded(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """``t`` rounded to ``fmt`` (round to nearest even) and back to its own dtype."""
    return t.detach().to(getattr(torch, fmt)).to(t.dtype)


def build(method: Method, model: CharMLP, lr: float) -> tuple[torch.optim.Optimizer, Callable[[], torch.Tensor] | None]:
    """Optimizer (and loss penalty, for L2-SP) for ``model``, whose pretrained weights are already loaded."""
    k, v = method.kind, method.value
    lr = method.lr or lr
    if k in ("adamw", "adamw_random"):
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
        anchor = None
        if method.anchor != "float32":
            anchor = {n: rounded(p, method.anchor) for n, p in model.named_parameters() if not n.startswith("head.")}
        return DualOpt.for_finetuning(model, head="head", lr=lr, layer_index=method.layers, rollback_max=v / lr,
                                      head_weight_decay=HEAD_WEIGHT_DECAY, anchor=anchor), None
    if k == "adamw_scratch":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=v), None
    if k == "dualopt_scratch":
        return DualOpt(model.parameters(), lr=lr, paradigm="scratch", weight_decay=v,
                       layer_index=method.layers), None
    raise ValueError(f"unknown method kind {k!r}")
