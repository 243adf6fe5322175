"""Multi-tensor fast path of ``dualopt.keras.DualOpt`` on the torch backend.

Keras runs a custom optimizer's ``update_step`` once per variable, in Python;
on many small variables that loop is far slower than Keras's built-in torch
Adam, which uses ``torch._foreach_*`` (benchmarks/README.md).
:func:`update_group` is the one delegation point that picks the evaluator:

- Adam, float32/float64 operands the kernel takes (contiguous, one device):
  torch's fused Adam kernel (``torch._fused_adam_``, torch's code, as
  :mod:`dualopt.torch` uses it), then the core's :func:`~decoupled_core.pull`
  on lists. The kernel evaluates the pre-weight in another order and computes
  its scalars in float64, so it agrees with the per-variable path to rounding
  (conformance row ``keras DualOpt [torch]``; ``Policy(fused_adam=False)`` is
  row ``keras DualOpt [torch] (core on lists)``).
- Everything else: the core's own functions
  (:func:`decoupled_core.adam_coefficients`, ``adam_pre_weight`` /
  ``sgd_pre_weight``, ``pull_coefficient``, ``pull``) on lists of tensors
  (:mod:`dualopt._shared.torch_lists`), one ``torch._foreach_*`` call per core
  operation, so it performs the per-variable path's operations in the same
  order (``tests/keras`` checks the bits, since ``torch._foreach_*`` is a
  private API).

Large tensors are updated in flat pieces and the operations run on batches of
pieces (:class:`Policy`), so that the temporaries and the pieces each operation
reads again stay in cache; every operation is element-wise, so this changes no
bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, cast

import torch

from decoupled_core import (AdamState, HyperParams, SGDState, adam_coefficients, adam_pre_weight, pull_coefficient,
                            sgd_pre_weight)

from .._shared.torch_lists import TORCH_LISTS, PerTensor, TensorList, copy_back, pull_into

__all__ = ["Policy", "Entry", "update", "update_group"]


@dataclass(frozen=True)
class Policy:
    """The sizes the fast path works in (tests shrink them to exercise every split).

    Tensors with more than ``chunk_elems`` elements are updated in flat pieces
    of at most that many; the operations run on batches of pieces (and small
    tensors) of about ``batch_elems`` elements. ``fused_adam=False`` keeps Adam
    on the core's lists as well (the conformance row of that evaluator).
    """

    chunk_elems: int = 1 << 16
    batch_elems: int = 1 << 18
    fused_adam: bool = True


class Entry(NamedTuple):
    """One variable: its value, gradient, slots (m, v or the momentum buffer), anchor (None unless
    finetune), the hyperparameters of its paradigm and its pull rate rho."""

    param: torch.Tensor
    grad: torch.Tensor
    slots: tuple[torch.Tensor, ...]
    anchor: torch.Tensor | None
    hp: HyperParams
    rate: float


class _Row(NamedTuple):
    """A piece of one entry (or the whole entry) and its pull coefficient (None: the pull is skipped)."""

    param: torch.Tensor
    grad: torch.Tensor
    slots: list[torch.Tensor]
    anchor: torch.Tensor | None
    c: torch.Tensor | None
    paradigm: str


def update(entries: Sequence[Entry], learning_rate: Any, step: torch.Tensor, policy: Policy | None = None) -> None:
    """One step of every entry, in place, grouped by dtype and device.

    ``learning_rate`` is eta_t as Keras passes it (a tensor or a number) and
    ``step`` is t counting this step; both are cast once to each group's
    dtype, as the generic path casts them for each variable (torch's fused
    kernel reads t as a float32 tensor, as torch's own step counts are kept).
    """
    groups: dict[tuple[Any, Any], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.param.dtype, e.param.device), []).append(e)
    for group in groups.values():
        update_group(group, learning_rate, step, policy or Policy())


def update_group(entries: list[Entry], learning_rate: Any, step: torch.Tensor, policy: Policy) -> None:
    """The fast path's one delegation point: torch's fused Adam, or the core on lists (module docstring).

    ``entries`` share one dtype and device.
    """
    dtype, device = entries[0].param.dtype, entries[0].param.device
    lr = torch.as_tensor(learning_rate, dtype=dtype, device=device)
    fused: list[Entry] = []
    rest: list[Entry] = []
    for e in entries:
        (fused if _fused_takes(e, policy) else rest).append(e)
    if fused:
        _fused_adam(fused, lr, torch.as_tensor(step, dtype=torch.float32, device=device))
    if rest:
        _update_group(rest, lr, torch.as_tensor(step, dtype=dtype, device=device), policy)


def _fused_takes(e: Entry, policy: Policy) -> bool:
    """Whether torch's fused Adam kernel takes this entry: it walks raw storage linearly on one device.

    Every operand must have the parameter's shape: the kernel checks no sizes, so a shorter gradient
    (one Keras would broadcast) would be read past its end. Such entries take the core on lists, which
    broadcasts or raises as Keras's own optimizers do.
    """
    operands = (e.param, e.grad, *e.slots) + ((e.anchor,) if e.anchor is not None else ())
    return (policy.fused_adam and e.hp.direction == "adam" and e.param.dtype in (torch.float32, torch.float64)
            and all(x.shape == e.param.shape and x.is_contiguous() and x.dtype == e.param.dtype
                    and x.device == e.param.device for x in operands))


def _fused_adam(entries: list[Entry], lr: torch.Tensor, t: torch.Tensor) -> None:
    """torch's fused Adam (the pre-weight, in place), then the core's pull of the pulled entries."""
    params = [e.param for e in entries]
    hp = entries[0].hp
    # The kernel reads t as the count including this step (torch.optim advances its counts before the call).
    torch._fused_adam_(params, [e.grad for e in entries], [e.slots[0] for e in entries],
                       [e.slots[1] for e in entries], [], [t] * len(entries), lr=lr, beta1=hp.beta1,
                       beta2=hp.beta2, weight_decay=0.0, eps=hp.eps, amsgrad=False, maximize=False)
    cs = _pull_coefficients(entries, lr)
    if cs:
        new = list(params)
        _pull(new, cs, [e.hp.paradigm for e in entries], [e.anchor for e in entries])
        copy_back(params, new)


def _pull_coefficients(entries: Sequence[Entry], lr: torch.Tensor) -> dict[int, torch.Tensor]:
    """The core's ``pull_coefficient`` of every entry it pulls, by index; an entry whose c is host-known 0
    (rate 0 or paradigm "none", as ``pull_coefficient`` says) is left out."""
    pulled = [i for i, e in enumerate(entries) if e.hp.paradigm != "none" and e.rate != 0.0]
    if not pulled:
        return {}
    rates = PerTensor(torch.tensor([entries[i].rate for i in pulled], dtype=lr.dtype, device=lr.device).unbind(0))
    return dict(zip(pulled, pull_coefficient(lr, rates, xp=TORCH_LISTS).tensors))


def _pull(values: list[torch.Tensor], cs: dict[int, torch.Tensor], paradigms: Sequence[str],
          anchors: Sequence[torch.Tensor | None]) -> None:
    """The core's pull of ``values[i]`` by ``cs[i]`` for every ``i`` in ``cs``, put back in ``values``:
    towards ``anchors[i]`` in finetune, towards 0 in scratch (one multi-tensor evaluation per paradigm)."""
    for paradigm in ("finetune", "scratch"):
        idx = [i for i in cs if paradigms[i] == paradigm]
        if idx:
            towards = [cast(torch.Tensor, anchors[i]) for i in idx] if paradigm == "finetune" else None
            pull_into(values, idx, towards, [cs[i] for i in idx])


def _pieces(t: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Flat views of at most ``chunk`` elements covering ``t`` (``t`` itself when it is small)."""
    return [t] if t.numel() <= chunk else list(t.view(-1).split(chunk))


def _update_group(entries: list[Entry], lr: torch.Tensor, t: torch.Tensor, policy: Policy) -> None:
    """One dtype/device group: the scalars once, then the core's operations batch by batch."""
    hp = entries[0].hp  # the direction's hyperparameters are the same in every paradigm
    coeffs = adam_coefficients(lr, hp.beta1, hp.beta2, t, xp=TORCH_LISTS) if hp.direction == "adam" else None
    cs = _pull_coefficients(entries, lr)
    rows: list[_Row] = []
    for i, e in enumerate(entries):
        # A tensor is split only where all of its in-place targets are contiguous (views).
        targets = [e.param, *e.slots] + ([e.anchor] if e.anchor is not None else [])
        chunk = policy.chunk_elems if all(x.is_contiguous() for x in targets) else max(e.param.numel(), 1)
        split = [_pieces(x, chunk) for x in targets]
        grads = _pieces(e.grad.contiguous(), chunk)
        n = len(e.slots)
        for k, g in enumerate(grads):
            pieces = [s[k] for s in split]
            rows.append(_Row(pieces[0], g, pieces[1:1 + n], pieces[-1] if e.anchor is not None else None, cs.get(i),
                             e.hp.paradigm))
    batch: list[_Row] = []
    size = 0
    for row in rows:
        if batch and size + row.param.numel() > policy.batch_elems:
            _update_batch(hp, coeffs, lr, batch)
            batch, size = [], 0
        batch.append(row)
        size += row.param.numel()
    if batch:
        _update_batch(hp, coeffs, lr, batch)


def _update_batch(hp: HyperParams, coeffs: Any, lr: torch.Tensor, rows: list[_Row]) -> None:
    """The core's pre-weight and pull on the batch's lists, then the results written back in place."""
    params = [r.param for r in rows]
    slots = [[r.slots[k] for r in rows] for k in range(len(rows[0].slots))]
    # The core reads the weight and each slot once (no device-side skip here): they take the results in place.
    theta, grad = TensorList(params, donate=True), TensorList([r.grad for r in rows])
    given = [TensorList(s, donate=True) for s in slots]
    state: AdamState | SGDState
    if hp.direction == "adam":
        pre, state = adam_pre_weight(theta, grad, AdamState(*given), beta1=hp.beta1, beta2=hp.beta2,
                                     eps=hp.eps, step_size=coeffs.step_size, inv_sqrt_bc2=coeffs.inv_sqrt_bc2,
                                     xp=TORCH_LISTS)
    else:
        pre, state = sgd_pre_weight(theta, grad, SGDState(*given), lr=lr, momentum=hp.momentum,
                                    nesterov=hp.nesterov, xp=TORCH_LISTS)
    new = pre.tensors
    _pull(new, {i: r.c for i, r in enumerate(rows) if r.c is not None}, [r.paradigm for r in rows],
          [r.anchor for r in rows])
    copy_back(params, new)
    for target, value in zip(slots, state):
        copy_back(target, value.tensors)
