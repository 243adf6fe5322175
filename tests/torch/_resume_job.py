"""The training job of the torch resume checks, shared by the tests and by ``_resume_worker.py``.

A small MLP (``backbone``: two Linear+Tanh, ``head``: Linear) is trained with
cross-entropy on fixed numpy data, with a cosine ``LambdaLR`` schedule, one
tensor left without a gradient every fourth step (its own step count falls
behind) and one step whose gradients hold a NaN (skipped, counted). Everything
that a resume must restore is therefore exercised: moments, anchors,
per-tensor step counts, the skip counter, the scheduler and the fast path's
cached plans.

A checkpoint is what a user writes: ``model.state_dict()``,
``optimizer.state_dict()`` and ``scheduler.state_dict()`` through
``torch.save``; it is read back with ``torch.load(weights_only=True)`` into a
freshly built model, optimizer and scheduler.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dualopt.torch import DualOpt

N_STEPS = 16
#: Resume points: the very first step, an early one, mid-run, and the last but one.
RESUME_AT = (1, 2, 7, 15)
LR = 0.02
NAN_STEP = 5  # 0-based step whose gradient of one tensor holds a NaN: skipped by nonfinite="skip"
MODES = ("scratch", "finetune", "mixed")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    mode: str = "mixed"  # scratch | finetune | mixed (finetune backbone, scratch head)
    direction: str = "adam"
    foreach: bool | None = None  # None: fast path; False: reference loop
    dtype: str = "float32"
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(),
                                            torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.head = torch.nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 6)), rng.integers(0, 3, 16)) for _ in range(N_STEPS)]


def make_optimizer(model: torch.nn.Module, cfg: Config, **overrides: Any) -> DualOpt:
    layer_index = overrides.pop("layer_index", "module")
    common = dict(lr=LR, direction=cfg.direction, foreach=cfg.foreach, momentum=0.9,
                  nesterov=cfg.direction == "sgd", **overrides)
    if cfg.mode == "scratch":
        return DualOpt(model.named_parameters(), paradigm="scratch", weight_decay=0.5, layer_index=layer_index,
                       **common)
    if cfg.mode == "finetune":
        return DualOpt(model.named_parameters(), paradigm="finetune", rollback_max=20.0, rollback_min=1.0,
                       layer_index=layer_index, **common)
    return DualOpt.for_finetuning(model, head="head", head_lr=2 * LR, weight_decay=0.5, rollback_max=20.0,
                                  layer_index=layer_index, **common)


def schedule(t: int) -> float:
    return 0.5 + 0.5 * math.cos(math.pi * t / N_STEPS)


def build(cfg: Config, hidden: int = 8, **overrides: Any) -> tuple[Net, DualOpt, Any]:
    """A fresh model (seeded init, so a "pretrained" backbone), optimizer and scheduler."""
    torch.manual_seed(cfg.seed)
    model = Net(hidden).to(DTYPES[cfg.dtype])
    opt = make_optimizer(model, cfg, **overrides)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return model, opt, sched


def train_step(model: Net, opt: DualOpt, sched: Any, batch: tuple[np.ndarray, np.ndarray], k: int) -> None:
    """Step ``k`` (0-based) of the job."""
    x, y = batch
    dtype = next(model.parameters()).dtype
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
    loss.backward()
    if k % 4 == 3:
        model.head.bias.grad = None  # no gradient: this tensor is not stepped, its step count stays behind
    if k == NAN_STEP:
        model.backbone[2].weight.grad[0, 0] = float("nan")  # the whole step is skipped (spec section 8)
    opt.step()
    sched.step()


def train(model: Net, opt: DualOpt, sched: Any, start: int, stop: int, data: list | None = None) -> None:
    data = data if data is not None else batches()
    for k in range(start, stop):
        train_step(model, opt, sched, data[k], k)


def checkpoint(model: Net, opt: DualOpt, sched: Any, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": step}


def save(ckpt: dict[str, Any], path: str | None = None) -> bytes | None:
    """``torch.save`` to ``path`` atomically (write, then rename), or to bytes when ``path`` is None."""
    if path is None:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return None


def load(source: bytes | str) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)``: plain tensors and containers only, no pickled objects."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    return torch.load(f, weights_only=True)


def restore(cfg: Config, ckpt: dict[str, Any]) -> tuple[Net, DualOpt, Any, int]:
    """Fresh objects built as at the start, then every state loaded from ``ckpt``."""
    model, opt, sched = build(cfg)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return model, opt, sched, int(ckpt["step"])


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy()  # the raw bits: numpy has no bfloat16
    return t.numpy().copy()


def snapshot(model: Net, opt: DualOpt, sched: Any) -> dict[str, np.ndarray]:
    """Everything a resume must reproduce, as numpy arrays keyed by name (params, state, counters, lr)."""
    out: dict[str, np.ndarray] = {}
    names = {p: n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[f"param/{n}"] = _np(p)
    for p, st in opt.state.items():
        for key, value in st.items():
            out[f"state/{names[p]}/{key}"] = _np(value) if isinstance(value, torch.Tensor) else np.asarray(value)
            if isinstance(value, torch.Tensor):
                out[f"dtype/{names[p]}/{key}"] = np.asarray(str(value.dtype))
    out["skipped"] = np.asarray(opt.skipped)
    out["lr"] = np.asarray([g["lr"] for g in opt.param_groups])
    out["scheduler_epoch"] = np.asarray(sched.last_epoch)
    return out
