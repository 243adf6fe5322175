"""How :mod:`dualopt.torch` evaluates one update of the tensors of a parameter group.

- :func:`loop_update`: :func:`decoupled_core.step_tensor` tensor by tensor on torch
  arrays (``foreach=False``, tensors the fast path cannot take, and what
  ``torch.compile`` traces).
- :class:`FastPlan` (the default, ``foreach=None/True``): tensors are bucketed by
  device and dtype, and :func:`update_bucket`, the one delegation point, picks
  the evaluator of each bucket:

  * SGD: the core's :func:`~decoupled_core.sgd_pre_weight` and
    :func:`~decoupled_core.pull` on lists of tensors
    (:mod:`dualopt._shared.torch_lists`), bit for bit the loop's result;
  * Adam: torch's fused Adam kernel (``torch._fused_adam_``/``_fused_adamw_``),
    then the pull as one multi-tensor ``lerp`` (finetune) or multiply (scratch);
    scratch tensors of ``Policy.fold_min_numel`` elements or more fold the pull
    into AdamW's decoupled decay. The kernel evaluates the formula in another
    order, so it agrees with the core to rounding (the conformance suite's
    ``torch DualOpt (fast path)`` row and ``conformance.tolerances.FAST_PATH_TOLERANCE``);
  * Adam finetune on CPU, tensors of ``Policy.native_min_numel`` elements or
    more: the C kernel of :mod:`dualopt.torch._native` where it loads (the
    core's operations in the core's order; row ``torch DualOpt (C kernel)``).

On ``Policy.sync_free_devices`` (CUDA) and under ``torch.compile`` a step reads
nothing back to the host: the NaN/Inf flag stays a 0-d device tensor, the
fused kernel takes it as ``found_inf``, the core takes ``keep = (flag == 0)``,
and the step counts (0-d float32 tensors, as torch's fused Adam keeps them)
advance by ``1 - flag``. float16/bfloat16 parameters are updated through float32
working copies and rounded back once.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch

from decoupled_core import (AdamState, HyperParams, SGDState, adam_coefficients, compute_dtype, pull_coefficient,
                            sgd_pre_weight, step_tensor)

from .._shared.torch_lists import TORCH_LISTS, TensorList, copy_back, pull_into
from . import _native as native

__all__ = ["Policy", "DEFAULT_POLICY", "loop_update", "FastPlan", "update_bucket", "state_problem", "init_state"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where the fast path hands tensors to which evaluator (``DualOpt(..., _policy=Policy(...))``).

    Attributes
    ----------
    fast_devices : tuple of str
        Device types the fast path takes; tensors elsewhere take the loop.
    fold_min_numel : int
        Adam scratch tensors of at least this many elements fold the pull into the
        fused AdamW call (one call per distinct coefficient); smaller ones share one
        call and a multi-tensor multiply, cheaper than a call each.
    native_min_numel : int
        Adam finetune tensors on CPU of at least this many elements take the C kernel
        where it loads; smaller ones stay in torch's batched fused call (the
        conformance suite sets 0 to run every vector through the kernel).
    sync_free_devices : tuple of str
        Device types whose steps decide a skip on the device (module docstring); on
        CPU a host read costs nothing and keeps the C kernel.
    """

    fast_devices: tuple[str, ...] = ("cpu", "cuda")
    fold_min_numel: int = 1 << 15
    native_min_numel: int = 1 << 15
    sync_free_devices: tuple[str, ...] = ("cuda",)


DEFAULT_POLICY = Policy()

#: The state entries of each direction (spec section 6), in the order plans hold them.
_STATE_KEYS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def _xp() -> Any:
    import array_api_compat.torch as xp

    return xp


def init_state(state: dict[str, Any], p: torch.Tensor, direction: str) -> None:
    """Add ``step = 0`` and the direction's zero moments (compute dtype) where ``state`` lacks them."""
    if "step" not in state:
        # A 0-d float32 tensor on the parameter's device, as torch's fused/capturable Adam keeps it.
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    cd = compute_dtype(p.dtype, torch)
    for k in _STATE_KEYS[direction]:
        if k not in state:
            state[k] = torch.zeros_like(p, dtype=cd, memory_format=torch.preserve_format)


def loop_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                rates: Sequence[float], *, hp: HyperParams, lr: float, maximize: bool, traced: bool = False,
                found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
    """One update through :func:`decoupled_core.step_tensor`, tensor by tensor; writes back in place.

    ``states[i]["step"]`` must already count this update. ``traced``: the step
    count stays a tensor (no host read; under ``torch.compile``), ``found_inf``
    (0-d, 1.0 = skip) keeps every bit of a skipped tensor by a select, and
    ``grad_scale`` divides the gradients first (GradScaler's unscale).
    """
    xp = _xp()
    keep = None if found_inf is None else found_inf == 0
    for p, g, st, rate in zip(params, grads, states, rates):
        if grad_scale is not None:
            cd = compute_dtype(p.dtype, torch)
            g = g.to(cd) / grad_scale.to(cd)
        if maximize:
            g = -g  # exact; the core expects the gradient of the minimised objective
        ds: Any = (AdamState(st["exp_avg"], st["exp_avg_sq"]) if hp.direction == "adam"
                   else SGDState(st["momentum_buffer"]))
        anchor = st["anchor"] if hp.paradigm == "finetune" else None
        # a traced count in float64, like the host's coefficients (spec: scalars on the host in float64)
        step = st["step"].to(torch.float64) if traced else int(st["step"])
        new_p, new_ds = step_tensor(p.detach(), g, ds, anchor, hp=hp, lr=lr, step=step, rate=rate, xp=xp)
        if keep is not None:
            new_p = torch.where(keep, new_p, p.detach())
            new_ds = type(ds)(*(torch.where(keep, new, old) for old, new in zip(ds, new_ds)))
        p.copy_(new_p)
        for old, new in zip(ds, new_ds):
            old.copy_(new)


def state_problem(p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
                  keys: Sequence[str]) -> str | None:
    """Why ``p``'s gradient or state tensors ``keys`` do not fit ``p``, else None.

    Every state tensor must have ``p``'s shape and device and the compute dtype
    of ``p``'s dtype; the gradient ``p``'s shape, device and dtype. A parameter
    converted after the optimizer was created (``model.double()``) breaks this,
    and no update path may then run: the C kernel would read and write past its
    buffers, torch's kernels would fail or cast silently.
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
                 rates: Sequence[float], hp: HyperParams, policy: Policy) -> None:
        self.idx = idx
        self.params = [params[i] for i in idx]
        self.states = [states[i] for i in idx]
        self.rates = [rates[i] for i in idx]
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.cd = compute_dtype(self.dtype, torch)
        self.anchors = [st["anchor"] for st in self.states] if hp.paradigm == "finetune" else []
        self.slots = [[st[k] for st in self.states] for k in _STATE_KEYS[hp.direction]]
        self.foldable = hp.direction == "adam" and hp.paradigm == "scratch"
        self.large = [p.numel() >= policy.fold_min_numel for p in self.params] if self.foldable else []
        self.native_candidates = [k for k, p in enumerate(self.params) if p.numel() >= policy.native_min_numel] if (
            hp.direction == "adam" and hp.paradigm == "finetune" and self.device.type == "cpu"
            and self.cd in native.NATIVE_DTYPES) else []
        self.native: list[int] = []
        self.cs: list[float] = []
        self.lr: float | None = None
        self._rates_key: tuple[int, ...] | None = None

    def set_lr(self, lr: float) -> None:
        """Pull coefficients for learning rate ``lr`` (host float64, ``decoupled_core.pull_coefficient``)."""
        if lr == self.lr:
            return
        coefficient: dict[float, float] = {}  # one per distinct rate (usually one per layer)
        self.cs = [coefficient[r] if r in coefficient else coefficient.setdefault(r, pull_coefficient(lr, r))
                   for r in self.rates]
        self.lr = lr
        self.use_native(bool(self.native_candidates) and native.library() is not None)

    def use_native(self, on: bool) -> None:
        """Split the tensors between the C kernel (``on``) and torch's kernels for the current ``cs``."""
        cs = self.cs
        self.native = self.native_candidates if on else []
        # Adam scratch: large tensors with 0 < c < 1 fold the pull into the fused kernel, one call per
        # distinct c; the rest share one call and a multiply.
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
            self.pull_scalars: list[torch.Tensor] = []
            return
        key = tuple(self.pulled)
        if key != self._rates_key:  # a host-to-device copy only when the pulled set changes, not per lr
            self._rates = torch.tensor([self.rates[k] for k in self.pulled], dtype=torch.float64, device=self.device)
            self._rates_key = key
        # The host's coefficients formed on the device in the host's float64 (same bits as
        # pull_coefficient on floats), rounded once to the working dtype.
        c = pull_coefficient(self.lr, self._rates, xp=_xp())
        # Adam scratch multiplies pre by (1 - c), Adam finetune lerps by c, the core takes c.
        self.pull_stack = (1.0 - c if self.foldable else c).to(self.cd)
        self.pull_scalars = list(self.pull_stack.unbind())


class FastPlan:
    """The fast path's bookkeeping for one parameter group, built once and reused while nothing changes.

    A plan depends on which tensors have gradients, the direction, the paradigm
    and the pull rates (its ``key``); :class:`dualopt.torch.DualOpt` rebuilds it
    when the key changes or :meth:`holds` fails, and drops all plans when it
    loads a state dict. beta1, beta2, eps, momentum and nesterov are read from
    ``run``'s ``hp`` at every step (OneCycleLR cycles them).
    """

    def __init__(self, key: Any, params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
                 rates: Sequence[float], *, hp: HyperParams, policy: Policy = DEFAULT_POLICY) -> None:
        self.key = key
        self._names = _STATE_KEYS[hp.direction] + (("anchor",) if hp.paradigm == "finetune" else ())
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self.loop: list[int] = []
        for i, p in enumerate(params):
            # The fused kernel walks raw storage linearly: every operand must be contiguous.
            if p.device.type in policy.fast_devices and p.is_contiguous() and all(
                    states[i][k].is_contiguous() for k in self._names):
                groups.setdefault((p.device, p.dtype), []).append(i)
            else:
                self.loop.append(i)
        self.buckets = [_Bucket(idx, params, states, rates, hp, policy) for idx in groups.values()]
        self.params, self.states, self.rates = params, states, rates
        self._step_buffer: torch.Tensor | None = None
        if params and all(p.device.type == "cpu" for p in params):
            # On CPU a multi-tensor add is a loop of single adds: the counts become 0-d views of one
            # buffer, advanced by one add. CUDA's multi-tensor add is one kernel.
            buf = torch.stack([st["step"].detach().to(torch.float32) for st in states])
            for i, st in enumerate(states):
                st["step"] = buf[i]
            self._step_buffer = buf
        self._steps = [st["step"] for st in states]
        self._tensors = [st[k] for st in states for k in self._names]
        self._dtypes = [p.dtype for p in params]

    def holds(self, states: Sequence[dict[str, Any]]) -> bool:
        """Whether ``states`` are still the dicts and tensors the plan holds lists of.

        False after ``optimizer.state`` was cleared or replaced, an entry of it
        reassigned, or a parameter changed dtype in place (``model.double()``):
        the caller then checks the state again and builds a new plan.
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
        """Whether :meth:`run` can take ``found_inf`` without a host read: no tensor on the loop or the C kernel."""
        return not self.loop and (torch.compiler.is_compiling() or not any(b.native_candidates for b in self.buckets))

    def run(self, grads: Sequence[torch.Tensor], *, hp: HyperParams, lr: float, maximize: bool,
            found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
        """Apply one update; ``grads`` aligned with the plan's params, step counts already advanced.

        ``found_inf`` (0-d float32, only where :attr:`sync_free`): 1.0 makes the update change
        nothing, decided on the device. ``grad_scale`` (same condition): the gradients' scale.
        """
        if (found_inf is not None or grad_scale is not None) and not self.sync_free:
            raise RuntimeError("DualOpt: found_inf/grad_scale need the sync-free path (no loop, no C kernel)")
        loop = self.loop
        fused: list[tuple[_Bucket, list[torch.Tensor]]] = []
        for b in self.buckets:
            gs = [grads[i] for i in b.idx] if len(b.idx) != len(grads) else list(grads)
            if all(g.dtype == b.dtype and g.is_contiguous() for g in gs):
                fused.append((b, gs))
            else:  # an unusual gradient layout: this bucket takes the loop this time
                loop = loop + b.idx
        if loop:
            pick = lambda xs: [xs[i] for i in loop]  # noqa: E731
            loop_update(pick(self.params), pick(grads), pick(self.states), pick(self.rates), hp=hp, lr=lr,
                        maximize=maximize, traced=found_inf is not None or grad_scale is not None,
                        found_inf=found_inf, grad_scale=grad_scale)
        for b, gs in fused:
            b.set_lr(lr)
            if grad_scale is not None and hp.direction != "adam":
                torch._foreach_div_(gs, grad_scale.to(b.device))  # the host route's unscale (fused Adam: in the kernel)
                grad_scale_b = None
            else:
                grad_scale_b = grad_scale
            work = [p.to(b.cd) for p in b.params] if b.cd != b.dtype else b.params
            if b.cd != b.dtype:
                gs = [g.to(b.cd) for g in gs]
            update_bucket(b, work, gs, hp=hp, lr=lr, maximize=maximize, found_inf=found_inf, grad_scale=grad_scale_b)
            if b.cd != b.dtype:
                torch._foreach_copy_(b.params, work)  # round back once, at the end


def update_bucket(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                  maximize: bool, found_inf: torch.Tensor | None = None,
                  grad_scale: torch.Tensor | None = None) -> None:
    """The fast path's one delegation point: the C kernel, torch's fused Adam, or the core on lists.

    ``work`` holds the bucket's parameters in the compute dtype (updated in
    place), ``grads`` the gradients in that dtype. Adam finetune tensors on CPU
    that the C kernel takes (``b.native``) go to it; the other Adam tensors to
    torch's fused kernel and the multi-tensor pull; SGD to the core's
    ``sgd_pre_weight`` and ``pull`` on :class:`TensorList` operands.
    """
    if hp.direction != "adam":
        _core_on_lists(b, work, grads, hp=hp, lr=lr, maximize=maximize, found_inf=found_inf)
    elif b.native and not _native_adam(b, work, grads, hp=hp, lr=lr, maximize=maximize):
        b.use_native(False)  # an operand the C kernel cannot take this step: torch's kernels take them
        try:
            _fused_adam(b, work, grads, hp=hp, lr=lr, maximize=maximize)
        finally:
            b.use_native(True)
    else:
        _fused_adam(b, work, grads, hp=hp, lr=lr, maximize=maximize, found_inf=found_inf, grad_scale=grad_scale)


def _core_on_lists(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                   maximize: bool, found_inf: torch.Tensor | None) -> None:
    """The core's SGD pre-weight and pull over the bucket; ``found_inf`` becomes the core's ``keep``."""
    keep = None if found_inf is None else found_inf == 0
    g = TensorList(torch._foreach_neg(grads) if maximize else grads)
    (bufs,) = b.slots
    # The core reads the buffer and the weight once, so they may take the results in place; not under a
    # device-side skip, whose select needs the old values after the update.
    donate = keep is None
    pre, state = sgd_pre_weight(TensorList(work, donate=donate), g, SGDState(TensorList(bufs, donate=donate)),
                                lr=lr, momentum=hp.momentum, nesterov=hp.nesterov, xp=TORCH_LISTS, keep=keep)
    new = pre.tensors
    if b.pulled:
        pull_into(new, b.pulled, [b.anchors[k] for k in b.pulled] if b.anchors else None, b.pull_scalars)
    if keep is not None:  # a skipped step keeps the old weights (the core kept the buffers)
        new = TORCH_LISTS.where(keep, TensorList(new), TensorList(work)).tensors
    copy_back(bufs, state.momentum_buffer.tensors)
    copy_back(work, new)


def _native_adam(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                 maximize: bool) -> bool:
    """The C kernel's share of the bucket (``b.native``); False, touching nothing, where it cannot run now.

    Every operand is checked at every step, before any call: a user may swap
    ``p.data`` or hand in an odd gradient between steps, and C trusts pointers.
    """
    if torch.compiler.is_compiling():
        return False
    ks = b.native
    m, v = b.slots
    pick = lambda xs: [xs[k] for k in ks]  # noqa: E731
    if native.operand_problem(pick(work), pick(grads), pick(m), pick(v), pick(b.anchors)) is not None:
        return False
    by_step: dict[int, list[int]] = {}
    for k in ks:
        by_step.setdefault(int(b.states[k]["step"]), []).append(k)  # CPU only: no device to wait for
    for step, kk in by_step.items():
        coeffs = adam_coefficients(lr, hp.beta1, hp.beta2, step)
        pick = lambda xs: [xs[k] for k in kk]  # noqa: E731
        native.adam_pull(pick(work), pick(grads), pick(m), pick(v), pick(b.anchors), pick(b.cs), beta1=hp.beta1,
                         beta2=hp.beta2, eps=hp.eps, step_size=coeffs.step_size, inv_sqrt_bc2=coeffs.inv_sqrt_bc2,
                         maximize=maximize)
    return True


def _fused_adam(b: _Bucket, work: list[torch.Tensor], grads: list[torch.Tensor], *, hp: HyperParams, lr: float,
                maximize: bool, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
    """torch's fused Adam over the bucket's torch share, then the pull (folded into AdamW for large scratch tensors).

    ``(1 - c) * pre = theta * (1 - lr' * wd') - lr' * m_hat / denom`` with ``lr' = lr * (1 - c)``
    and ``wd' = c / lr'``; the others: ``pre + c * (a - pre)`` (one lerp) or ``(1 - c) * pre``.
    """
    steps = [st["step"] for st in b.states]
    m, v = b.slots
    kw: dict[str, Any] = dict(beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, amsgrad=False, maximize=maximize,
                              found_inf=found_inf, grad_scale=grad_scale)
    for c, ks in b.folded.items():
        lr_folded = lr * (1.0 - c)
        torch._fused_adamw_([work[k] for k in ks], [grads[k] for k in ks], [m[k] for k in ks], [v[k] for k in ks],
                            [], [steps[k] for k in ks], lr=lr_folded, weight_decay=c / lr_folded, **kw)
    rest = b.rest
    if len(rest) == len(work):
        torch._fused_adam_(work, grads, m, v, [], steps, lr=lr, weight_decay=0.0, **kw)
    elif rest:
        torch._fused_adam_([work[k] for k in rest], [grads[k] for k in rest], [m[k] for k in rest],
                           [v[k] for k in rest], [], [steps[k] for k in rest], lr=lr, weight_decay=0.0, **kw)
    if not b.pulled:
        return
    pre = work if len(b.pulled) == len(work) else [work[k] for k in b.pulled]
    weights = b.pull_scalars
    if found_inf is not None:  # a skipped step pulls by nothing: lerp by 0, multiply by 1 (one small select)
        weights = list(torch.where(found_inf != 0, 0.0 if b.anchors else 1.0, b.pull_stack).unbind())
    if b.anchors:
        torch._foreach_lerp_(pre, [b.anchors[k] for k in b.pulled], weights)
    elif hp.paradigm == "scratch":
        torch._foreach_mul_(pre, weights)
