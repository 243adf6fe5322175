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
is a :class:`PerTensor` list of 0-d tensors. The results are new tensors, except where
an input was donated (``TensorList(state, donate=True)``): the core reads each state
value once, so the new moments land in the old ones' memory; the caller writes back
only the results that are not already their destination (``torch._foreach_copy_``).

:func:`nonfinite_flag` is torch's one NaN/Inf check (a device-side flag, no host
read); :func:`grads_finite` is its host answer. Both are shared by ``dualopt.torch``
and ``dualopt.keras`` on torch; this module imports torch and the core only.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import torch

from decoupled_core import pull

__all__ = ["TensorList", "PerTensor", "TORCH_LISTS", "pull_into", "copy_back", "nonfinite_flag", "grads_finite",
           "SUM_CHECK_MIN_NUMEL"]

#: Contiguous gradients with at least this many elements are checked on the host route through their sum
#: (a read-only pass; only a non-finite sum is re-checked element-wise); smaller ones share one
#: multi-tensor call of GradScaler's check.
SUM_CHECK_MIN_NUMEL = 1 << 15


class TensorList:
    """Tensors of one dtype and device behaving as one array under ``+ - * /`` (each one multi-tensor call).

    The other operand may be a Python number, a 0-d tensor (one coefficient for
    every tensor) or a :class:`TensorList` of the same length (tensors, or 0-d
    per-tensor coefficients).

    A result that nothing but the expression refers to (an unnamed temporary,
    told by its reference count, as numpy elides temporaries) is updated in
    place by the next operation instead of allocating a new list: a fresh
    allocation costs about twice an in-place sweep on CPU. Only results of this
    class's own operations are reused, never the caller's tensors, and a list
    whose memory was reused refuses to be read again (``RuntimeError``).

    ``donate=True`` hands the caller's tensors over to the first operation
    that reads the list (``__len__`` and ``dtype`` do not count): it may write
    its result into them, as into a temporary, and the list is unreadable
    afterwards whether or not it did, so a second read fails loudly instead of
    seeing the new values.

    Examples
    --------
    >>> import torch
    >>> x = TensorList([torch.tensor([1.0, 2.0]), torch.tensor([3.0])])
    >>> [t.tolist() for t in (0.5 * x - x).tensors]
    [[-0.5, -1.0], [-1.5]]
    """

    __slots__ = ("_tensors", "_owned", "_donated")

    def __init__(self, tensors: Iterable[torch.Tensor], *, donate: bool = False, _owned: bool = False) -> None:
        self._tensors: list[torch.Tensor] | None = list(tensors)
        self._owned = _owned or donate  # the tensors were made by an operation of this class, or given: reusable
        self._donated = donate  # consumed by its first operation, named or not

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            raise RuntimeError("this TensorList's memory was reused by a later operation (or donated to one): "
                               "it cannot be read")
        return self._tensors

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __len__(self) -> int:
        return len(self.tensors)

    def __neg__(self) -> TensorList:
        mine = sys.getrefcount(self) <= _TEMPORARY or self._donated
        if self._owned and mine:
            return self._reused(torch._foreach_neg_, ())
        return type(self)(torch._foreach_neg(self.tensors), _owned=True)

    def __add__(self, other: Any) -> TensorList:
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        theirs = sys.getrefcount(other) <= _TEMPORARY
        return _binary("add", self, other, mine, theirs)

    def __radd__(self, other: Any) -> TensorList:  # IEEE addition commutes exactly
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        return _binary("add", self, other, mine, False)

    def __sub__(self, other: Any) -> TensorList:
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        theirs = sys.getrefcount(other) <= _TEMPORARY
        return _binary("sub", self, other, mine, theirs)

    def __rsub__(self, other: Any) -> TensorList:
        return (-self) + other  # f - x == (-x) + f, exactly

    def __mul__(self, other: Any) -> TensorList:
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        theirs = sys.getrefcount(other) <= _TEMPORARY
        return _binary("mul", self, other, mine, theirs)

    def __rmul__(self, other: Any) -> TensorList:  # IEEE multiplication commutes exactly
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        return _binary("mul", self, other, mine, False)

    def __truediv__(self, other: Any) -> TensorList:
        mine = sys.getrefcount(self) <= _TEMPORARY  # before self is pushed as an argument below
        return _binary("div", self, other, mine, False)

    def _reused(self, inplace: Any, args: tuple[Any, ...]) -> TensorList:
        tensors = self.tensors
        inplace(tensors, *args)
        self._tensors = None  # any later read of this object is an error, never a silently changed value
        return type(self)(tensors, _owned=True)

    def _consumed(self) -> list[torch.Tensor]:
        """The tensors; a donated list is spent by this read."""
        tensors = self.tensors
        if self._donated:
            self._tensors = None
        return tensors


class PerTensor(TensorList):
    """One 0-d coefficient per tensor (the pull's ``c``): in ``c * x`` the shaped list ``x`` leads the
    multi-tensor call and the coefficients broadcast, which keeps torch's fast multi-tensor route."""

    __slots__ = ()

    def __mul__(self, other: Any) -> TensorList:
        theirs = sys.getrefcount(other) <= _TEMPORARY
        if isinstance(other, TensorList) and not isinstance(other, PerTensor):
            return _binary("mul", other, self, theirs, False)
        return super().__mul__(other)


def _binary(op: str, x: TensorList, other: Any, x_temporary: bool, other_temporary: bool) -> TensorList:
    """``x op other``, in place into whichever operand is an unnamed result of a TensorList operation (or
    donated); a donated operand is spent either way."""
    x_temporary = x_temporary or x._donated
    other_temporary = other_temporary or (isinstance(other, TensorList) and other._donated)
    out = _binary_op(op, x, other, x_temporary, other_temporary)
    for operand in (x, other):
        if isinstance(operand, TensorList) and operand._donated:
            operand._tensors = None
    return out


def _binary_op(op: str, x: TensorList, other: Any, x_temporary: bool, other_temporary: bool) -> TensorList:
    xs = x.tensors
    operand = _operand(other, len(xs))
    if op == "sub" and isinstance(other, torch.Tensor):  # x - t == x + (-t), exactly; sub has no Tensor overload
        op, operand = "add", -other
    shaped = isinstance(other, TensorList)
    cls = PerTensor if isinstance(x, PerTensor) and (not shaped or isinstance(other, PerTensor)) else TensorList
    if x._owned and x_temporary:
        return x._reused(getattr(torch, f"_foreach_{op}_"), (operand,))
    if shaped and other._owned and other_temporary and type(other) is type(x) and op in ("add", "mul", "sub"):
        if op == "sub":  # x - o == (-o) + x, exactly
            torch._foreach_neg_(operand)
            op = "add"
        return other._reused(getattr(torch, f"_foreach_{op}_"), (xs,))
    return cls(getattr(torch, f"_foreach_{op}")(xs, operand), _owned=True)


def pull_into(values: list[torch.Tensor], idx: Sequence[int], anchors: Sequence[torch.Tensor] | None,
              coefficients: Sequence[torch.Tensor]) -> None:
    """The core's :func:`~decoupled_core.pull` of ``values[i]`` for ``i`` in ``idx`` (towards ``anchors``, or 0
    where None, by the 0-d ``coefficients``), each result put back in ``values[i]``."""
    out = pull(TensorList(values[i] for i in idx), None if anchors is None else TensorList(anchors),
               PerTensor(coefficients), xp=TORCH_LISTS)
    for i, x in zip(idx, out.tensors):
        values[i] = x


def copy_back(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """``torch._foreach_copy_(targets, values)``, leaving out the values computed in their target's memory
    (a donated input): copying a tensor onto itself would still cost a pass."""
    pairs = [(t, v) for t, v in zip(targets, values) if t is not v]
    if pairs:
        torch._foreach_copy_([t for t, _ in pairs], [v for _, v in pairs])


def _calibrate() -> int:
    """The reference count an unnamed temporary shows inside a binary operator of a Python class, or 0 (no
    reuse) where this interpreter does not tell a temporary from a named value that way."""
    counts: dict[str, list[int]] = {"temporary": [], "named": []}

    class Probe:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def __mul__(self, other: Any) -> Probe:
            mine = sys.getrefcount(self)  # the statement form TensorList's operators use
            theirs = sys.getrefcount(other)
            counts[self.kind].append(mine)
            if isinstance(other, Probe):
                counts[other.kind].append(theirs)
            return Probe("temporary")

        def __rmul__(self, other: Any) -> Probe:
            mine = sys.getrefcount(self)
            counts[self.kind].append(mine)
            return Probe("temporary")

    def run() -> None:
        a = Probe("named")
        b = Probe("named")
        (a * 2.0) * 2.0
        2.0 * (a * 2.0)
        a * b
        b * (a * 2.0)
        (a * 2.0) * b
        a * 2.0
        2.0 * a
        keep = (a,)
        keep[0] * 2.0

    run()
    temporary, named = set(counts["temporary"]), set(counts["named"])
    return temporary.pop() if len(temporary) == 1 and min(temporary) < min(named) else 0


_TEMPORARY = _calibrate()


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
        return type(x)([t.to(dtype, copy=copy) for t in x._consumed()], _owned=True)
    return x.to(dtype, copy=copy)


def _sqrt(x: Any) -> Any:
    return type(x)(torch._foreach_sqrt(x._consumed()), _owned=True) if isinstance(x, TensorList) else torch.sqrt(x)


def _where(condition: torch.Tensor, a: Any, b: Any) -> Any:
    """``torch.where`` with a 0-d condition, tensor by tensor (the device-side skip's select)."""
    if isinstance(a, TensorList):
        return TensorList([torch.where(condition, x, y) for x, y in zip(a._consumed(), b._consumed())], _owned=True)
    return torch.where(condition, a, b)


def _clip(x: Any, lo: float, hi: float) -> Any:
    if isinstance(x, TensorList):
        return type(x)(torch._foreach_clamp_max(torch._foreach_clamp_min(x._consumed(), lo), hi), _owned=True)
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

    Under ``torch.compile`` it is one read-only reduction per gradient
    (``sum(g - g)``, NaN exactly where ``g`` holds a NaN or an Inf). Otherwise
    contiguous gradients go through GradScaler's multi-tensor check, one call
    per dtype (``_amp_foreach_non_finite_check_and_unscale_`` with
    ``inv_scale = 1``, which writes each value back unchanged, NaN and -0.0
    included); any other layout (an expanded, stride-0 view, whose elements
    share memory) is read with ``isfinite().all()``. All gradients must be
    plain tensors on ``device``.
    """
    if torch.compiler.is_compiling():
        # GradScaler's check writes every gradient back, which a compiled graph keeps as a copy; a read-only
        # reduction instead: g - g is +0 where g is finite and NaN where it is NaN or +-Inf (exact, no overflow).
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        sums = torch.stack([(g - g).sum(dtype=torch.float32) for g in grads])
        return torch.isnan(sums).any().to(torch.float32)
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
    its sum (NaN and Inf propagate through addition, and ``torch.sum`` only
    reads). The sums of a device are stacked and read back once; only a
    gradient whose sum is not finite (finite values may overflow) is then
    checked element-wise. A sharded gradient (a ``DTensor``) is reduced across
    ranks (``full_tensor``), so that every rank takes the same decision.
    """
    small: dict[torch.device, list[torch.Tensor]] = {}
    large: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if type(g) is not torch.Tensor:  # a DTensor: its reductions are per rank until completed
            if not _global_bool(torch.isfinite(g).all()):
                return False
        elif g.numel() >= SUM_CHECK_MIN_NUMEL and g.is_contiguous():
            large.setdefault(g.device, []).append(g)
        else:
            small.setdefault(g.device, []).append(g)
    for gs in large.values():
        # float32 sums: float16/bfloat16 ones would overflow at 65504, and one stack needs one dtype (a float64
        # value or sum beyond float32's range becomes Inf and is then checked element-wise, exactly).
        sums = torch.stack([g.sum(dtype=torch.float32) for g in gs])
        finite = torch.isfinite(sums)
        if not bool(finite.all()):
            suspects = [g for g, ok in zip(gs, finite.tolist()) if not ok]
            if not all(bool(torch.isfinite(g).all()) for g in suspects):
                return False
    return all(not bool(nonfinite_flag(gs, device)) for device, gs in small.items())


def _global_bool(flag: Any) -> bool:
    """``bool`` of a 0-d flag, completed across ranks first where it is a partial ``DTensor`` reduction."""
    full = getattr(flag, "full_tensor", None)
    return bool(full() if full is not None else flag)
