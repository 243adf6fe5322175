"""Multi-tensor fast path of ``dualopt.keras.DualOpt`` on the torch backend.

Keras runs a custom optimizer's ``update_step`` once per variable, in Python;
on many small variables that loop is about 10x slower than Keras's built-in
torch Adam, which uses ``torch._foreach_*``. This module performs the core's
operations (:func:`decoupled_core.step_tensor`, spec section 4) in the same
order, each as one ``torch._foreach_*`` call over all variables:

- adam: ``m*b1``, ``g*(1-b1)``, add; ``v*b2``, ``g*g``, ``*(1-b2)``, add;
  ``sqrt(v)``, ``*inv_sqrt_bc2``, ``+eps``; ``m/d``, ``*step_size``,
  ``theta - .``;
- sgd: ``b*mu``, ``+g``; (nesterov: ``b*mu``, ``+g``); ``*lr``, ``theta - .``;
- pull: finetune ``pre - c*(pre - a)``, scratch ``pre - c*pre``; skipped when
  ``c`` is host-known 0.

The scalars are the generic path's (:func:`decoupled_core.adam_coefficients`
and :func:`decoupled_core.pull_coefficient` on ``keras.ops``), so both paths
give the same bits; ``tests/keras`` checks it, since ``torch._foreach_*`` and
``torch._amp_foreach_non_finite_check_and_unscale_`` are private APIs.

The non-finite check uses ``torch._amp_foreach_non_finite_check_and_unscale_``
with a scale of 1 (the check GradScaler uses: one pass over all gradients). It
multiplies the gradients in place by 1.0, which leaves every value, NaN and
-0.0 included, unchanged. The decision to skip is taken on the host (torch runs
eagerly), like GradScaler's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from keras import ops

from decoupled_core import adam_coefficients

from ._keras_xp import KERAS_XP

__all__ = ["update", "all_finite_torch"]


def all_finite_torch(grads: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every gradient is finite."""
    by_device: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    flags = []
    for device, gs in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, torch.ones(1, dtype=torch.float32, device=device))
        flags.append(found.to(grads[0].device))
    return (torch.cat(flags).sum() == 0).reshape(())


def update(opt: Any, grads: list[Any], variables: list[Any], learning_rate: Any) -> None:
    """One DualOpt apply over ``variables`` (runs under ``torch.no_grad``)."""
    from .keras import _StepContext

    grads = [ops.convert_to_tensor(g) for g in grads]
    finite = all_finite_torch(grads) if opt.nonfinite == "skip" else None
    ctx = _StepContext(opt, learning_rate, finite)
    if finite is not None and not bool(finite):
        opt._advance_counters(ctx)
        return
    groups: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    fallback = []
    for i, v in enumerate(variables):
        f = opt._facts[opt._get_variable_index(v)]
        if f.compute_dtype != str(v.value.dtype).replace("torch.", ""):
            fallback.append(i)  # float16/bfloat16 compute in float32: the generic per-variable path
        else:
            groups[(v.value.dtype, v.value.device)].append(i)
            if grads[i].dtype != v.value.dtype:  # the core's astype(grad, compute dtype)
                grads[i] = grads[i].to(v.value.dtype)
    for idx in groups.values():
        _update_group(opt, ctx, [opt._facts[opt._get_variable_index(variables[i])] for i in idx],
                      [variables[i].value for i in idx], [grads[i] for i in idx])
    if fallback:
        ctx.select = False  # the step is known to be finite here
        opt._runtime.context = ctx
        try:
            for i in fallback:
                opt.update_step(grads[i], variables[i], learning_rate)
        finally:
            opt._runtime.context = None
    opt._advance_counters(ctx)


def _update_group(opt: Any, ctx: Any, facts: list[Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    lr, t = ctx.scalars[facts[0].compute_dtype]
    slots = [[f.slots[k].value for f in facts] for k in range(len(facts[0].slots))]
    if opt.direction == "adam":
        coeffs = adam_coefficients(lr, opt.beta_1, opt.beta_2, t, xp=KERAS_XP)
        m, v = slots
        torch._foreach_mul_(m, opt.beta_1)
        torch._foreach_add_(m, torch._foreach_mul(grads, 1.0 - opt.beta_1))
        torch._foreach_mul_(v, opt.beta_2)
        gg = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(gg, 1.0 - opt.beta_2)
        torch._foreach_add_(v, gg)
        d = torch._foreach_sqrt(v)
        torch._foreach_mul_(d, coeffs.inv_sqrt_bc2)
        torch._foreach_add_(d, opt.epsilon)
        u = torch._foreach_div(m, d)
        torch._foreach_mul_(u, coeffs.step_size)
        torch._foreach_sub_(params, u)
    else:
        (b,) = slots
        torch._foreach_mul_(b, opt.momentum)
        torch._foreach_add_(b, grads)
        if opt.nesterov:
            u = torch._foreach_mul(b, opt.momentum)
            torch._foreach_add_(u, grads)  # g + mu*b: IEEE addition commutes exactly
        else:
            u = b
        u = torch._foreach_mul(u, lr)
        torch._foreach_sub_(params, u)
    # params now hold the pre-weights; pull them (spec 4.2).
    finetune = [(p, f) for p, f in zip(params, facts) if f.paradigm == "finetune" and f.rate != 0.0]
    scratch = [(p, f) for p, f in zip(params, facts) if f.paradigm == "scratch" and f.rate != 0.0]
    if finetune:
        pre = [p for p, _ in finetune]
        diff = torch._foreach_sub(pre, [f.anchor.value for _, f in finetune])
        torch._foreach_mul_(diff, _coefficients(lr, [f.rate for _, f in finetune]))
        torch._foreach_sub_(pre, diff)
    if scratch:
        pre = [p for p, _ in scratch]
        pulled = torch._foreach_mul(pre, _coefficients(lr, [f.rate for _, f in scratch]))
        torch._foreach_sub_(pre, pulled)


def _coefficients(lr: torch.Tensor, rates: list[float]) -> list[torch.Tensor]:
    """Each tensor's c = clip(lr * rate, 0, 1) as 0-d tensors, computed as one vector op.

    Element by element this is :func:`decoupled_core.pull_coefficient` on the
    generic path: ``lr * rate`` with the Python float ``rate`` rounded to lr's
    dtype (as torch does for a scalar operand), then clipped to [0, 1].
    """
    r = torch.tensor(rates, dtype=lr.dtype, device=lr.device)
    return list(torch.clamp(lr * r, 0.0, 1.0).unbind(0))
