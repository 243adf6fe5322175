"""Training loop shared by the fine-tuning and from-scratch benchmarks.

Everything is seeded: the batch positions come from a ``torch.Generator`` and
evaluation uses fixed, evenly spaced positions, so a run is a pure function of
its arguments (torch runs single-threaded in each worker; see ``runner.py``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["windows", "sample_batch", "evaluate", "cosine_schedule", "train"]


def windows(stream: torch.Tensor, positions: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``stream[i-context:i]`` and targets ``stream[i]`` for every position ``i``."""
    offsets = torch.arange(-context, 0)
    return stream[positions[:, None] + offsets], stream[positions]


def sample_batch(stream: torch.Tensor, context: int, batch_size: int, generator: torch.Generator):
    positions = torch.randint(context, stream.numel(), (batch_size,), generator=generator)
    return windows(stream, positions, context)


@torch.no_grad()
def evaluate(model: nn.Module, stream: torch.Tensor, context: int, n: int = 8192, batch: int = 2048,
             head: nn.Module | None = None) -> dict[str, float]:
    """Mean cross-entropy (nats per character) and top-1 accuracy at ``n`` evenly spaced positions.

    ``head`` replaces the model's own output layer (used to score the upstream
    task with the upstream head on a fine-tuned backbone). Returns
    ``{"loss": ..., "acc": ...}``.
    """
    was_training = model.training
    model.eval()
    count = min(n, stream.numel() - context)
    positions = torch.from_numpy(np.linspace(context, stream.numel() - 1, count).round().astype(np.int64))
    total, correct = 0.0, 0
    for k in range(0, count, batch):
        x, y = windows(stream, positions[k:k + batch], context)
        logits = (head or model.head)(model.features(x))
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return {"loss": total / count, "acc": correct / count}


def cosine_schedule(steps: int) -> Callable[[int], float]:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR``: cosine from 1 to 0 over ``steps``."""
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, stream: torch.Tensor, *, steps: int,
          batch_size: int, generator: torch.Generator,
          penalty: Callable[[], torch.Tensor] | None = None,
          on_eval: Callable[[int, bool], dict] | None = None, eval_every: int = 0) -> dict:
    """Train with a cosine learning-rate schedule; return the loss curve and wall time.

    ``penalty()`` is added to the loss (L2-SP). ``on_eval(step, final)`` is called
    every ``eval_every`` steps and after the last one (``final=True``); its dicts
    form ``curve``.
    """
    context = model.cfg.context
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps))
    curve, t0 = [], time.perf_counter()
    train_losses = []
    model.train()
    for step in range(1, steps + 1):
        x, y = sample_batch(stream, context, batch_size, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        train_losses.append(float(loss.detach()))
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_eval is not None and ((eval_every and step % eval_every == 0) or step == steps):
            curve.append({"step": step, **on_eval(step, step == steps)})
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            "last_batch_loss": float(np.mean(train_losses[-50:]))}
