"""The core's rule on lists of tensors, one ``torch._foreach_*`` call per operation; torch's finiteness check.

:class:`TensorList` holds the tensors of one bucket (same dtype and device) and
gives them the arithmetic operators :mod:`decoupled_core.rule` uses; ``TORCH_LISTS``
is the ``xp`` namespace that goes with it. With them the core's functions run
unchanged over a whole bucket::

    pre, state = adam_pre_weight(TensorList(ps), TensorList(gs), AdamState(TensorList(m), TensorList(v)),
                                 beta1=..., ..., xp=TORCH_LISTS)

Every operation of the core becomes one multi-tensor call in the core's order,
with host scalars passed as Python floats (rounded once to the working dtype by
the kernel, as ``tensor * float`` does): on CPU torch's multi-tensor ops loop over
the same per-tensor kernels, so the result is the core evaluated tensor by tensor
with torch, bit for bit. A coefficient that differs per tensor (the pull's ``c``)
is a :class:`TensorList` of 0-d tensors. The results are new tensors; the caller
writes them back (``torch._foreach_copy_``).

:func:`nonfinite_flag` is torch's one NaN/Inf check (a device-side flag, no host
read); :func:`grads_finite` is its host answer. Both are shared by ``dualopt.torch``
and ``dualopt.keras`` on torch; this module imports torch and the core only.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

__all__ = ["TensorList", "TORCH_LISTS", "nonfinite_flag", "grads_finite", "SUM_CHECK_MIN_NUMEL"]

#: Contiguous gradients with at least this many elements are checked on the host route through their sum
#: (a read-only pass; only a non-finite sum is re-checked element-wise); smaller ones share one
#: multi-tensor call of GradScaler's check.
SUM_CHECK_MIN_NUMEL = 1 << 15


class TensorList:
    """Tensors of one dtype and device behaving as one array under ``+ - * /`` (each one multi-tensor call).

    The other operand may be a Python number, a 0-d tensor (one coefficient for
    every tensor) or a :class:`TensorList` of the same length (tensors, or 0-d
    per-tensor coefficients).

    Examples
    --------
    >>> import torch
    >>> x = TensorList([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    >>> [t.tolist() for t in (0.5 * x - x).tensors]
    [[-0.5, -1.0], [-1.5]]
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __len__(self) -> int:
        return len(self.tensors)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def __add__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_add(self.tensors, _operand(other, len(self))))

    __radd__ = __add__  # IEEE addition commutes exactly

    def __sub__(self, other: Any) -> TensorList:
        if isinstance(other, torch.Tensor):  # x - t == x + (-t), exactly; there is no Tensor overload of sub
            return TensorList(torch._foreach_add(self.tensors, -other))
        return TensorList(torch._foreach_sub(self.tensors, _operand(other, len(self))))

    def __rsub__(self, other: Any) -> TensorList:
        return (-self) + other  # f - x == (-x) + f, exactly

    def __mul__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _operand(other, len(self))))

    __rmul__ = __mul__  # IEEE multiplication commutes exactly

    def __truediv__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_div(self.tensors, _operand(other, len(self))))


def _operand(other: Any, n: int) -> Any:
    if isinstance(other, TensorList):
        if len(other) != n:
            raise ValueError(f"TensorList operands of different lengths ({n} and {len(other)})")
        return other.tensors
    if isinstance(other, torch.Tensor):
        if other.dim() != 0:
            raise ValueError(f"a tensor operand of a TensorList must be 0-d, got shape {tuple(other.shape)}")
        return other
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return float(other)
    raise TypeError(f"a TensorList combines with numbers, 0-d tensors and TensorLists, not {type(other).__name__}")


def _astype(x: Any, dtype: torch.dtype, copy: bool = False) -> Any:
    if isinstance(x, TensorList):
        if x.dtype == dtype and not copy:
            return x
        return TensorList([t.to(dtype, copy=copy) for t in x.tensors])
    return x.to(dtype, copy=copy)


def _sqrt(x: Any) -> Any:
    return TensorList(torch._foreach_sqrt(x.tensors)) if isinstance(x, TensorList) else torch.sqrt(x)


def _where(condition: torch.Tensor, a: Any, b: Any) -> Any:
    """``torch.where`` with a 0-d condition, tensor by tensor (the device-side skip's select)."""
    if isinstance(a, TensorList):
        return TensorList([torch.where(condition, x, y) for x, y in zip(a.tensors, b.tensors)])
    return torch.where(condition, a, b)


def _clip(x: Any, lo: float, hi: float) -> Any:
    if isinstance(x, TensorList):
        return TensorList(torch._foreach_clamp_max(torch._foreach_clamp_min(x.tensors, lo), hi))
    return torch.clip(x, lo, hi)


class _TorchListNamespace:
    """``xp`` for :mod:`decoupled_core` on :class:`TensorList` operands (and on 0-d tensors: traced coefficients)."""

    float32 = torch.float32
    float64 = torch.float64
    finfo = staticmethod(torch.finfo)
    astype = staticmethod(_astype)
    sqrt = staticmethod(_sqrt)
    where = staticmethod(_where)
    clip = staticmethod(_clip)


TORCH_LISTS = _TorchListNamespace()


def nonfinite_flag(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on ``device``: 1.0 where any gradient holds a NaN or Inf, else 0.0; no host read.

    Contiguous gradients go through GradScaler's multi-tensor check, one call
    per dtype (``_amp_foreach_non_finite_check_and_unscale_`` with
    ``inv_scale = 1``, which writes each value back unchanged, NaN and -0.0
    included); any other layout (an expanded, stride-0 view, whose elements
    share memory) is read with ``isfinite().all()``. All gradients must be
    plain tensors on ``device``.
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


def grads_finite(grads: Sequence[torch.Tensor]) -> bool:
    """The host's answer: every element of every gradient is finite (reads the flags back).

    Plain tensors: :func:`nonfinite_flag` per device, except that a contiguous
    gradient of ``SUM_CHECK_MIN_NUMEL`` elements or more is read once through
    its sum first (NaN and Inf propagate through addition, and ``torch.sum``
    only reads) and checked element-wise only when the sum is not finite
    (finite values may overflow). A sharded gradient (a ``DTensor``) is reduced
    across ranks (``full_tensor``), so that every rank takes the same decision.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if type(g) is not torch.Tensor:  # a DTensor: its reductions are per rank until completed
            if not _global_bool(torch.isfinite(g).all()):
                return False
        elif g.numel() >= SUM_CHECK_MIN_NUMEL and g.is_contiguous():
            wide = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
            if not bool(torch.isfinite(g.sum(dtype=wide))) and not bool(torch.isfinite(g).all()):
                return False
        else:
            by_device.setdefault(g.device, []).append(g)
    return all(not bool(nonfinite_flag(gs, device)) for device, gs in by_device.items())


def _global_bool(flag: Any) -> bool:
    """``bool`` of a 0-d flag, completed across ranks first where it is a partial ``DTensor`` reduction."""
    full = getattr(flag, "full_tensor", None)
    return bool(full() if full is not None else flag)
