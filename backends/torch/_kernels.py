"""Update kernels of :mod:`dualopt.torch`.

Two implementations of one update of a batch of tensors that share a parameter
group (same hyperparameters and learning rate):

- :func:`reference_update` loops over the tensors and calls
  :func:`decoupled_core.step_tensor`: it *is* the spec's rule, evaluated with
  torch arrays through array-api-compat. ``foreach=False`` selects it.
- :func:`fast_update` is the multi-tensor path (the default):

  * ``direction="sgd"`` re-expresses the core's operations one for one with
    ``torch._foreach_*`` (multiply by the host scalar, then add; no ``alpha=``
    arguments, which could fuse into an FMA), so it gives the reference path's
    bits.
  * ``direction="adam"`` runs torch's fused Adam kernel
    (``torch._fused_adam_`` / ``torch._fused_adamw_``: one pass over
    parameter, gradient and both moments) and then the pull. The fused kernel
    evaluates the same formula in a different order (it divides by
    ``sqrt(bias_correction2)`` instead of multiplying by the reciprocal, computes
    ``(step_size * m) / denom`` and may contract into FMAs), so it agrees with the
    core to rounding only: a few ulp of the parameter's magnitude per step (see
    ``FAST_PATH_TOLERANCE``). For scratch tensors of at least
    ``FOLD_MIN_NUMEL`` elements the pull is folded into the same pass through
    AdamW's decoupled decay: ``(1 - c) * pre = theta * (1 - lr' * wd') - lr' * m_hat/denom``
    with ``lr' = lr * (1 - c)`` and ``wd' = c / lr'``. Smaller tensors are
    batched into one fused call per group and pulled with one multi-tensor
    multiply (``(1 - c) * pre``), which is cheaper than one call per layer; the
    finetune pull is one ``torch._foreach_lerp_`` (``pre + c * (a - pre)``).
  * ``direction="adam"``, ``paradigm="finetune"`` on CPU: tensors of
    ``NATIVE_MIN_NUMEL`` elements and more take the C kernel of
    :mod:`dualopt.torch._native` where it loads (step and pull in one pass;
    the spec's operations in the spec's order, so bitwise equal to the core on
    numpy). Elsewhere, and when it does not build, the two calls above.

- :func:`traced_update` is what ``torch.compile`` traces: the core's rule per tensor on
  torch ops, kept or discarded by a select on the device-side finiteness flag.

On CUDA (``SYNC_FREE_DEVICES``) and under ``torch.compile``, nothing in a step waits for the
device: the NaN/Inf flag (:func:`nonfinite_flag`) is a 0-d tensor handed to the fused kernel as
``found_inf``, the pull weights are selected on the device, and the step counts (0-d float32
tensors, as torch's fused Adam keeps them) advance by ``1 - flag``.

float16/bfloat16 parameters are widened to float32 working copies, updated in
float32 (moments and anchors are float32 by the spec) and rounded back once.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch

from decoupled_core import (AdamState, HyperParams, SGDState, adam_coefficients, all_finite, compute_dtype,
                            pull_coefficient, step_tensor)

from . import _native as native

__all__ = [
    "FAST_DEVICES",
    "FOLD_MIN_NUMEL",
    "NATIVE_MIN_NUMEL",
    "FAST_PATH_TOLERANCE",
    "fast_path_tolerance",
    "reference_update",
    "traced_update",
    "FastPlan",
    "grads_finite_reference",
    "grads_finite_fast",
    "nonfinite_flag",
    "SYNC_FREE_DEVICES",
    "state_problem",
    "init_state",
]

#: Devices whose fused Adam kernel the fast path uses; others run the reference loop.
FAST_DEVICES = ("cpu", "cuda")

#: Scratch tensors with at least this many elements get the pull folded into the
#: fused kernel (one call per distinct pull coefficient); below it one batched
#: call per group plus a multi-tensor multiply costs less than the per-call overhead.
FOLD_MIN_NUMEL = 1 << 15

#: Adam finetune tensors on CPU with at least this many elements take the C kernel
#: (:mod:`dualopt.torch._native`) where it loads; smaller ones stay batched in torch's
#: fused call, where one call for thousands of tensors costs less than gathering their
#: pointers. The conformance suite sets it to 0 to run every spec vector through the kernel.
NATIVE_MIN_NUMEL = FOLD_MIN_NUMEL

#: Devices where ``step()`` decides a skip without reading anything back to the host: the
#: finiteness flag stays a 0-d device tensor and reaches the fused kernel as ``found_inf``
#: (GradScaler's route), the pull becomes a select and the step counts advance by ``1 - flag``.
#: On CPU a host read costs nothing, so the CPU path keeps its cheaper check and the C kernel;
#: under ``torch.compile`` every device takes the sync-free path (a host read breaks the graph).
SYNC_FREE_DEVICES = ("cuda",)

#: The fast Adam path's agreement with the reference path: after ``t`` updates
#: (same gradients) the difference of a tensor (parameter or moment) stays below
#: ``FAST_PATH_TOLERANCE * sqrt(t) * eps(dtype) * scale``, where ``scale`` is the
#: largest magnitude the reference tensor has held so far (the conformance
#: suite's scaled error; ``tests/torch`` asserts this form, which also holds
#: element-wise as ``... * (1 + |reference|)`` for values of order 1). Measured on
#: CPU, float32 and float64, every spec vector, tensors above and below
#: ``FOLD_MIN_NUMEL``, 300-step MLP runs: at most 0.1 of the bound (about 2-25 ulp
#: of the scale). Reasons: the fused kernel divides by ``sqrt(bias_correction2)``,
#: forms ``(step_size * m) / denom`` and may contract into FMAs; the fold and
#: ``_foreach_lerp_`` round ``(1 - c) * pre`` and ``pre + c * (a - pre)``
#: differently from the spec's ``pre - c * pre`` and ``pre - c * (pre - a)``.
#: SGD's fast path is bitwise equal to the reference path.
FAST_PATH_TOLERANCE = 16.0


def fast_path_tolerance(dtype: torch.dtype, steps: int) -> float:
    """``rtol`` (= ``atol`` at unit scale) that tests allow between the fast and reference Adam paths."""
    return FAST_PATH_TOLERANCE * math.sqrt(max(steps, 1)) * torch.finfo(dtype).eps


#: The state entries of each direction (spec section 6), in the order plans hold them.
_STATE_KEYS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def _xp() -> Any:
    import array_api_compat.torch as xp

    return xp


def init_state(state: dict[str, Any], p: torch.Tensor, direction: str) -> None:
    """Add ``step = 0`` and the direction's zero moments (compute dtype) where ``state`` lacks them.

    Called for every tensor that requires grad when the optimizer is created (or a
    group added, or a state dict loaded), and again before an update in case the
    state was cleared since.
    """
    if "step" not in state:
        # A 0-d float32 tensor on the parameter's device, as torch's fused/capturable Adam keeps it:
        # the fused kernel reads it there, and the sync-free path advances it without a host read.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    cd = compute_dtype(p.dtype, torch)
    zeros = lambda: torch.zeros_like(p, dtype=cd, memory_format=torch.preserve_format)  # noqa: E731
    if direction == "adam":
        if "exp_avg" not in state:
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
    elif "momentum_buffer" not in state:
        state["momentum_buffer"] = zeros()


def reference_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                     rates: Sequence[float], *, hp: HyperParams, lr: float, maximize: bool) -> None:
    """One update through :func:`decoupled_core.step_tensor`, tensor by tensor; writes back in place.

    ``states[i]["step"]`` must already count this update.
    """
    xp = _xp()
    for p, g, st, rate in zip(params, grads, states, rates):
        if maximize:
            g = -g  # exact; the core expects the gradient of the minimised objective
        if hp.direction == "adam":
            ds: Any = AdamState(st["exp_avg"], st["exp_avg_sq"])
        else:
            ds = SGDState(st["momentum_buffer"])
        anchor = st["anchor"] if hp.paradigm == "finetune" else None  # a finetune tensor must have one
        new_p, new_ds = step_tensor(p.detach(), g, ds, anchor, hp=hp, lr=lr, step=int(st["step"]), rate=rate, xp=xp)
        p.copy_(new_p)
        for old, new in zip(ds, new_ds):
            old.copy_(new)


def traced_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                  rates: Sequence[float], *, hp: HyperParams, lr: float, maximize: bool,
                  found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
    """The update under ``torch.compile``: :func:`decoupled_core.step_tensor` traced, kept where ``found_inf`` is 0.

    The spec's operations in the spec's order, as torch ops that the compiler fuses
    (Inductor: one loop per tensor over parameter, gradient, moments and anchor);
    the fused Adam kernel and the C kernel are opaque to it. Nothing is read on
    the host: the step count is the state's tensor (already advanced by
    ``1 - found_inf``) and the update is a select, so a skipped step leaves every
    bit of the parameter and its state in place. ``grad_scale`` divides the
    gradients first (GradScaler's unscale).
    """
    xp = _xp()
    keep = None if found_inf is None else found_inf != 0
    for p, g, st, rate in zip(params, grads, states, rates):
        cd = compute_dtype(p.dtype, torch)
        g = g.to(cd)
        if grad_scale is not None:
            g = g / grad_scale.to(cd)
        if maximize:
            g = -g
        if hp.direction == "adam":
            ds: Any = AdamState(st["exp_avg"], st["exp_avg_sq"])
        else:
            ds = SGDState(st["momentum_buffer"])
        anchor = st["anchor"] if hp.paradigm == "finetune" else None
        # float64 like the host's coefficients (spec: scalars on the host in float64)
        step = st["step"].to(torch.float64)
        new_p, new_ds = step_tensor(p.detach().to(cd), g, ds, anchor, hp=hp, lr=lr, step=step, rate=rate, xp=xp)
        if keep is not None:
            new_p = torch.where(keep, p.detach().to(cd), new_p)
            new_ds = [torch.where(keep, old, new) for old, new in zip(ds, new_ds)]
        p.copy_(new_p)
        for old, new in zip(ds, new_ds):
            old.copy_(new)


def grads_finite_reference(grads: Sequence[torch.Tensor]) -> bool:
    """The core's check (:func:`decoupled_core.all_finite`), one reduction per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    return all(_global_bool(all_finite(gs, xp=_xp())) for gs in by_device.values())


def _global_bool(flag: Any) -> bool:
    """``bool(flag)`` for a 0-d flag, the same answer on every rank of a sharded (FSDP2) parameter.

    A reduction (``all``, ``sum``) of a ``DTensor`` sharded on a mesh is a
    ``Partial`` DTensor, and ``bool()`` of it reads only this rank's part: a
    rank whose shard is finite would step while the rank holding the NaN skips.
    ``full_tensor()`` completes the reduction first (a no-op for a replicated
    flag); a plain tensor or bool is used as it is.
    """
    full = getattr(flag, "full_tensor", None)
    return bool(full() if full is not None else flag)


def grads_finite_fast(grads: Sequence[torch.Tensor]) -> bool:
    """The same answer as :func:`grads_finite_reference`, in one cheap read of the gradients.

    Small contiguous gradients: one multi-tensor call per (device, dtype) to the
    kernel GradScaler uses (``_amp_foreach_non_finite_check_and_unscale_``),
    which avoids a call per tensor. It writes every value back multiplied by
    ``inv_scale = 1``, i.e. unchanged, which is harmless only where each element
    has memory of its own: a gradient that is not contiguous (an expanded,
    stride-0 one, which torch's optimizers accept, or any other view) takes the
    read-only route of the large ones. Large gradients: a sum is finite only if
    every element is (NaN and +-Inf propagate through addition), and
    ``torch.sum`` is a fast vectorised read; a non-finite sum may also be an
    overflow of finite values, so those tensors are re-checked element-wise.
    """
    read_only: list[torch.Tensor] = []
    small: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:  # one pass: with thousands of small tensors this loop is a good part of the check
        if g.numel() >= FOLD_MIN_NUMEL or not g.is_contiguous():
            read_only.append(g)
        else:
            small.setdefault((g.device, g.dtype), []).append(g)
    flags = []
    for (device, _), gs in small.items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, torch.ones((), dtype=torch.float32, device=device))
        flags.append(found == 0)
    if read_only:
        sums = [g.sum(dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None) for g in read_only]
        suspects = [g for g, s in zip(read_only, sums) if not _global_bool(torch.isfinite(s))]
        if any(not _global_bool(torch.isfinite(g).all()) for g in suspects):
            return False
    return all(bool(f) for f in flags)


def nonfinite_flag(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on ``device``: 1.0 where any gradient holds a NaN or Inf, else 0.0; no host read.

    Contiguous gradients go through GradScaler's multi-tensor check
    (``_amp_foreach_non_finite_check_and_unscale_`` with ``inv_scale = 1``, which
    writes each value back unchanged); any other layout (expanded, stride-0 views,
    whose elements share memory) is read with ``isfinite().all()``. All gradients
    must be plain tensors on ``device``.
    """
    found = torch.zeros((), dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g.is_contiguous():
            by_dtype.setdefault(g.dtype, []).append(g)
        else:
            found = torch.maximum(found, (~torch.isfinite(g).all()).to(torch.float32))
    for gs in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, one)
    return found


def state_problem(p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
                  keys: Sequence[str]) -> str | None:
    """Why ``p``'s gradient or state tensors ``keys`` do not fit ``p``, else None.

    Every state tensor must have ``p``'s shape and device and the compute dtype
    of ``p``'s dtype (:func:`decoupled_core.compute_dtype`); the gradient ``p``'s
    shape, device and dtype. A parameter converted after the optimizer was
    created (``model.double()``) breaks this, and no update path may then run:
    the C kernel would read and write past its buffers, torch's kernels would
    fail or cast silently.
    """
    cd = compute_dtype(p.dtype, torch)
    if grad is not None and (grad.dtype != p.dtype or grad.device != p.device or grad.shape != p.shape):
        return (f"its gradient is {grad.dtype} on {grad.device} with shape {tuple(grad.shape)}, the parameter "
                f"{p.dtype} on {p.device} with shape {tuple(p.shape)}")
    for k in keys:
        t = state.get(k)
        if isinstance(t, torch.Tensor) and (t.dtype != cd or t.device != p.device or t.shape != p.shape):
            return (f"its optimizer state {k!r} is {t.dtype} on {t.device} with shape {tuple(t.shape)}, but a "
                    f"{p.dtype} parameter on {p.device} with shape {tuple(p.shape)} needs {cd} on {p.device} "
                    "with that shape")
    return None


class _Bucket:
    """Tensors of one group on one (device, dtype), with the lists the multi-tensor calls take."""

    def __init__(self, idx: list[int], params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                 rates: Sequence[float], hp: HyperParams) -> None:
        self.idx = idx
        self.params = [params[i] for i in idx]
        self.states = [states[i] for i in idx]
        self.rates = [rates[i] for i in idx]
        first = self.params[0]
        self.device, self.dtype = first.device, first.dtype
        self.cd = compute_dtype(self.dtype, torch)
        self.anchors = [st["anchor"] for st in self.states] if hp.paradigm == "finetune" else None
        if hp.direction == "adam":
            self.m = [st["exp_avg"] for st in self.states]
            self.v = [st["exp_avg_sq"] for st in self.states]
        else:
            self.bufs = [st["momentum_buffer"] for st in self.states]
        self.foldable = hp.direction == "adam" and hp.paradigm == "scratch"
        self.large = [p.numel() >= FOLD_MIN_NUMEL for p in self.params] if self.foldable else []
        # Adam finetune on CPU: large tensors take the C kernel (step and pull in one pass) when it loads.
        self.native_candidates = [k for k, p in enumerate(self.params) if p.numel() >= NATIVE_MIN_NUMEL] if (
            hp.direction == "adam" and hp.paradigm == "finetune" and self.device.type == "cpu"
            and self.cd in native.NATIVE_DTYPES) else []
        self.lr: float | None = None
        self._rates_key: tuple[int, ...] | None = None

    def set_lr(self, lr: float) -> None:
        """Pull coefficients for learning rate ``lr`` (host float64, ``decoupled_core.pull_coefficient``)."""
        if lr == self.lr:
            return
        coefficient: dict[float, float] = {}  # one per distinct rate (usually one per layer)
        cs = []
        for r in self.rates:
            c = coefficient.get(r)
            if c is None:
                c = coefficient[r] = pull_coefficient(lr, r)
            cs.append(c)
        self.cs = cs
        self.lr = lr
        self.use_native(bool(self.native_candidates) and native.library() is not None)

    def use_native(self, on: bool) -> None:
        """Split the tensors between the C kernel (``on``) and torch's kernels for the current ``cs``."""
        cs = self.cs
        self.native = self.native_candidates if on else []
        # Adam scratch: tensors of FOLD_MIN_NUMEL+ elements with 0 < c < 1 fold the pull into
        # the fused kernel, one call per distinct c; the rest share one call and a multiply.
        self.folded: dict[float, list[int]] = {}
        skip = set(self.native)
        self.rest = [k for k in range(len(cs)) if k not in skip]
        if self.foldable:
            self.rest = []
            for k, (large, c) in enumerate(zip(self.large, cs)):
                if large and 0.0 < c < 1.0:
                    self.folded.setdefault(c, []).append(k)
                else:
                    self.rest.append(k)
        self.pulled = [k for k in self.rest if cs[k] != 0.0]
        if not self.pulled:
            self.pull_stack = None
            self.pull_scalars = []
            return
        key = tuple(self.pulled)
        if key != self._rates_key:  # a host-to-device copy only when the pulled set changes, not per lr
            self._rates = torch.tensor([self.rates[k] for k in self.pulled], dtype=torch.float64,
                                       device=self.device)
            self._rates_key = key
        # The host's coefficients, formed on the device in the host's float64 (same bits as
        # pull_coefficient on floats) and rounded once to the working dtype.
        c = pull_coefficient(self.lr, self._rates, xp=_xp())
        # scratch multiplies pre by (1 - c); finetune lerps by c; SGD forms the core's c * (pre - a), c * pre.
        stack = 1.0 - c if self.foldable else c
        self.pull_stack = stack.to(self.cd)
        self.pull_scalars = list(self.pull_stack.unbind())


class FastPlan:
    """The fast path's bookkeeping for one parameter group, built once and reused while nothing changes.

    A plan depends on which tensors have gradients, the direction, the paradigm
    and the pull rates (its ``key``); :class:`dualopt.torch.DualOpt` rebuilds it
    when the key changes or :meth:`holds` fails (its state tensors were replaced),
    and drops all plans when it loads a state dict. The pull
    coefficients are recomputed when the learning rate changes.
    """

    def __init__(self, key: Any, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                 rates: Sequence[float], *, hp: HyperParams) -> None:
        # Only the direction, the paradigm and the rates shape a plan; beta1, beta2, eps,
        # momentum and nesterov are read from ``run``'s ``hp`` at every step (OneCycleLR
        # cycles beta1 or momentum every step, which must not rebuild the plan).
        self.key = key
        self._names = _STATE_KEYS[hp.direction] + (("anchor",) if hp.paradigm == "finetune" else ())
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self.loop: list[int] = []
        for i, p in enumerate(params):
            # The fused kernel walks raw storage linearly: every operand must be contiguous.
            if p.device.type in FAST_DEVICES and p.is_contiguous() and all(
                    states[i][k].is_contiguous() for k in self._names):
                groups.setdefault((p.device, p.dtype), []).append(i)
            else:
                self.loop.append(i)
        self.buckets = [_Bucket(idx, params, states, rates, hp) for idx in groups.values()]
        self.params, self.states, self.rates = params, states, rates
        self._step_buffer: torch.Tensor | None = None
        if params and all(p.device.type == "cpu" for p in params):
            # On CPU a multi-tensor add is a loop of single adds (3 ms for 2000 counts): the counts
            # become 0-d views of one buffer, advanced by one add. CUDA's multi-tensor add is one kernel.
            buf = torch.stack([st["step"].detach().to(torch.float32) for st in states])
            for i, st in enumerate(states):
                st["step"] = buf[i]
            self._step_buffer = buf
        self._steps = [st["step"] for st in states]
        self._tensors = [st[k] for st in states for k in self._names]
        self._dtypes = [p.dtype for p in params]

    def holds(self, states: Sequence[dict[str, Any]]) -> bool:
        """Whether ``states`` are still the dicts and tensors the plan holds lists of.

        False after ``optimizer.state`` was cleared or replaced, or an entry of it
        reassigned (the plan would update tensors that are no longer the state),
        or after a parameter changed dtype in place (``model.double()`` keeps the
        Parameter object and swaps its data): then the caller checks the state
        again and builds a new plan. No tensor is read.
        """
        return (len(states) == len(self.states) and all(map(operator.is_, states, self.states))
                and all(map(operator.is_, self._tensors, [st.get(k) for st in states for k in self._names]))
                and all(map(operator.is_, self._steps, [st.get("step") for st in states]))
                and [p.dtype for p in self.params] == self._dtypes)

    def advance(self, by: float | torch.Tensor = 1.0) -> None:
        """Add ``by`` (1, or ``1 - found_inf`` on the device) to the step count of every tensor of the plan."""
        if self._step_buffer is not None:
            self._step_buffer.add_(by)
        else:
            torch._foreach_add_(self._steps, by)

    @property
    def sync_free(self) -> bool:
        """Whether :meth:`run` can take ``found_inf`` without a host read: Adam, every tensor on torch's kernels.

        The C kernel (CPU only) and the reference loop read the step count on the host.
        """
        return (self._names[0] == "exp_avg" and not self.loop
                and (torch.compiler.is_compiling() or not any(b.native_candidates for b in self.buckets)))

    def run(self, grads: Sequence[torch.Tensor], *, hp: HyperParams, lr: float, maximize: bool,
            found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
        """Apply one update; ``grads`` aligned with the plan's params, step counts already advanced.

        ``hp`` is the group's current hyperparameters (same direction and paradigm as the plan's).
        ``found_inf`` (0-d float32, only where :attr:`sync_free`): 1.0 makes the update change
        nothing, decided on the device. ``grad_scale`` (same condition): the gradients are
        divided by it inside the fused kernel (GradScaler's scale).
        """
        if (found_inf is not None or grad_scale is not None) and not self.sync_free:
            raise RuntimeError("DualOpt: found_inf/grad_scale need the sync-free path (Adam on torch's kernels)")
        loop = self.loop
        fused: list[tuple[_Bucket, list[torch.Tensor]]] = []
        for b in self.buckets:
            gs = [grads[i] for i in b.idx] if len(b.idx) != len(grads) else list(grads)
            if all(g.dtype == b.dtype and g.is_contiguous() for g in gs):
                fused.append((b, gs))
            else:  # an unusual gradient layout: this bucket takes the reference loop this time
                loop = loop + b.idx
        if loop:
            pick = lambda xs: [xs[i] for i in loop]  # noqa: E731
            reference_update(pick(self.params), pick(grads), pick(self.states), pick(self.rates), hp=hp, lr=lr,
                             maximize=maximize)
        for b, gs in fused:
            b.set_lr(lr)
            if b.cd != b.dtype:
                work = [p.to(b.cd) for p in b.params]
                gs = [g.to(b.cd) for g in gs]
            else:
                work = b.params
            if hp.direction == "adam":
                _fused_adam(b, work, gs, hp=hp, lr=lr, maximize=maximize, found_inf=found_inf,
                            grad_scale=grad_scale)
            else:
                _foreach_sgd(b, work, gs, hp=hp, lr=lr, maximize=maximize)
            if b.cd != b.dtype:
                torch._foreach_copy_(b.params, work)  # round back once, at the end


def _scalars(values: list[float], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    # Per-tensor scalars as 0-d tensors of the working dtype: torch's multi-tensor
    # ops take them on a much cheaper path than a list of Python floats, and the
    # value is the same (the host float rounded once to the working dtype).
    return list(torch.tensor(values, dtype=dtype, device=device).unbind())


def _where_flag(flag: torch.Tensor | None, on_skip: float, b: _Bucket) -> list[torch.Tensor]:
    # The pull as a select: the bucket's weights where the step goes ahead, ``on_skip`` (a pull
    # that changes nothing) where ``flag`` says skip; one small op, whatever the number of tensors.
    if flag is None:
        return b.pull_scalars
    values = b.pull_stack
    return list(torch.where(flag != 0, torch.full_like(values, on_skip), values).unbind())


def _native_adam(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                 maximize: bool) -> bool:
    """The C kernel's share of the bucket (``b.native``); False, touching nothing, where it cannot run now.

    Every operand is checked at every step, before any call, because a user may
    swap ``p.data`` or hand in an odd gradient between steps and C would trust a
    wrong pointer or size; the checks cost a few attribute reads per large tensor.
    """
    if torch.compiler.is_compiling():
        return False
    ks = b.native
    pick = lambda xs: [xs[k] for k in ks]  # noqa: E731
    assert b.anchors is not None
    if native.operand_problem(pick(work), pick(grads), pick(b.m), pick(b.v), pick(b.anchors)) is not None:
        return False
    by_step: dict[int, list[int]] = {}
    for k in ks:
        by_step.setdefault(int(b.states[k]["step"]), []).append(k)  # CPU only: no device to wait for
    for step, kk in by_step.items():
        coeffs = adam_coefficients(lr, hp.beta1, hp.beta2, step)
        pick = lambda xs: [xs[k] for k in kk]  # noqa: E731
        native.adam_pull(pick(work), pick(grads), pick(b.m), pick(b.v), pick(b.anchors), pick(b.cs), beta1=hp.beta1,
                         beta2=hp.beta2, eps=hp.eps, step_size=coeffs.step_size, inv_sqrt_bc2=coeffs.inv_sqrt_bc2,
                         maximize=maximize)
    return True


def _fused_adam(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                maximize: bool, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
    if b.native and not _native_adam(b, work, grads, hp=hp, lr=lr, maximize=maximize):
        b.use_native(False)  # torch's kernels take these tensors this time
        try:
            _fused_adam(b, work, grads, hp=hp, lr=lr, maximize=maximize)
        finally:
            b.use_native(True)
        return
    steps = [st["step"] for st in b.states]
    kw = dict(beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, amsgrad=False, maximize=maximize, found_inf=found_inf,
              grad_scale=grad_scale)
    for c, ks in b.folded.items():
        lr_folded = lr * (1.0 - c)
        torch._fused_adamw_([work[k] for k in ks], [grads[k] for k in ks], [b.m[k] for k in ks],
                            [b.v[k] for k in ks], [], [steps[k] for k in ks], lr=lr_folded,
                            weight_decay=c / lr_folded, **kw)
    rest = b.rest
    if len(rest) == len(work):
        torch._fused_adam_(work, grads, b.m, b.v, [], steps, lr=lr, weight_decay=0.0, **kw)
    elif rest:
        torch._fused_adam_([work[k] for k in rest], [grads[k] for k in rest], [b.m[k] for k in rest],
                           [b.v[k] for k in rest], [], [steps[k] for k in rest], lr=lr, weight_decay=0.0, **kw)
    if not b.pulled:
        return
    pre = work if len(b.pulled) == len(work) else [work[k] for k in b.pulled]
    if hp.paradigm == "finetune":
        assert b.anchors is not None
        # pre + c * (a - pre); a skipped step lerps by 0 (pre + 0 * (a - pre)).
        torch._foreach_lerp_(pre, [b.anchors[k] for k in b.pulled], _where_flag(found_inf, 0.0, b))
    elif hp.paradigm == "scratch":
        torch._foreach_mul_(pre, _where_flag(found_inf, 1.0, b))  # (1 - c) * pre


def _foreach_sgd(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                 maximize: bool) -> None:
    # The core's operations, one multi-tensor op each (see decoupled_core.rule.sgd_pre_weight and pull).
    # Scalars go in as 0-d tensors of the working dtype (cheaper dispatch, same rounding).
    if maximize:
        grads = torch._foreach_neg(grads)
    mu, eta = _scalars([hp.momentum, lr], b.cd, b.device)
    torch._foreach_mul_(b.bufs, mu)
    torch._foreach_add_(b.bufs, grads)  # b = mu*b + g
    if hp.nesterov:
        update = torch._foreach_mul(b.bufs, mu)
        torch._foreach_add_(update, grads)  # u = g + mu*b (addition commutes bitwise)
        torch._foreach_mul_(update, eta)
    else:
        update = torch._foreach_mul(b.bufs, eta)
    torch._foreach_sub_(work, update)  # pre = theta - lr*u
    if not b.pulled:
        return
    pre = work if len(b.pulled) == len(work) else [work[k] for k in b.pulled]
    if hp.paradigm == "finetune":
        assert b.anchors is not None
        diff = torch._foreach_sub(pre, [b.anchors[k] for k in b.pulled])
        torch._foreach_mul_(diff, b.pull_scalars)  # c*(pre - a)
    else:
        diff = torch._foreach_mul(pre, b.pull_scalars)  # c*pre
    torch._foreach_sub_(pre, diff)
