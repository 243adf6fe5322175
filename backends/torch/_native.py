"""The optional C kernel of :mod:`dualopt.torch` (``native/dualopt_cpu.c``): build, load, call.

The finetune step reads one tensor more than AdamW (the anchor), which torch's
fused Adam kernel cannot read; ``native/dualopt_cpu.c`` does the spec's Adam
step and the pull in one pass (benchmarks/README.md has the figures). Its arithmetic is the core's,
operation for operation, compiled without FMA contraction: on float32 and
float64 it equals :func:`decoupled_core.step_tensor` evaluated with numpy bit
for bit (``tests/torch/test_torch_native.py`` asserts it).

The C file is compiled on first use with the system C compiler into a private
per-user cache directory (:mod:`dualopt.native._build` says where, and which
rules a directory and a library file must pass before anything is loaded); the
build takes well under a second. Without a compiler, where the build or the load
fails (with one warning), or with ``DUALOPT_NATIVE=0``, nothing changes but
speed: the optimizer keeps torch's fused kernels. :func:`native_status` says
which case holds, and why.

:func:`adam_pull` checks the dtype, device, layout and size of every operand
before the call, since C trusts the pointers and counts it is given.

Examples
--------
>>> from dualopt.torch._native import native_status
>>> native_status()["enabled"] in (True, False)
True
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import torch

from ..native import _build as _native_build

__all__ = ["NATIVE_DTYPES", "library", "native_status", "operand_problem", "adam_pull"]

_SOURCE = _native_build.NATIVE_DIR / "dualopt_cpu.c"
_ABI = 1  # DUALOPT_NATIVE_ABI in the C file
#: The dtypes the C kernels take (as they are; float16/bfloat16 go through float32 working copies).
NATIVE_DTYPES = (torch.float32, torch.float64)


class _AdamCoefficients(ctypes.Structure):
    # Same order as adam_coefficients in dualopt_cpu.c; host float64, rounded in C to the dtype.
    _fields_ = [(name, ctypes.c_double) for name in
                ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2")]


def _check(lib: ctypes.CDLL) -> None:
    if lib.dualopt_abi() != _ABI:
        raise OSError(f"ABI {lib.dualopt_abi()}, expected {_ABI}")
    vp = ctypes.c_void_p
    lib.dualopt_adam_pull.restype = None
    lib.dualopt_adam_pull.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int64, ctypes.POINTER(_AdamCoefficients),
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]


def _load() -> tuple[ctypes.CDLL, Path, str]:
    # Tried first: OpenMP threads. libgomp is already loaded by torch (torch/lib/libgomp.so.1 in the
    # CPU wheels), so the loader resolves this library's libgomp.so.1 to the same runtime and the
    # kernel shares torch's thread pool; a wheel whose libgomp has another name gets a second pool,
    # correct but slower. Without OpenMP the kernel runs serially.
    try:
        return _native_build.load(_SOURCE, _native_build.compile_flags(openmp=True), _check)
    except OSError as with_openmp:
        try:  # (after a compiler timeout this fails at once, with the same reason)
            return _native_build.load(_SOURCE, _native_build.compile_flags(openmp=False), _check)
        except OSError as without:
            if str(without) == str(with_openmp):
                raise
            raise OSError(f"{without} (with -fopenmp: {with_openmp})") from None


_library = _native_build.Library(_load, "C kernel of dualopt.torch")
_state = _library.state  # lib and reason (tests set lib to None to run the fallback)
library = _library.get
native_status = _library.status


# Subclasses such as DTensor, or the fake tensors torch.compile traces with, have no memory of their own to hand to C.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def operand_problem(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avg: Sequence[torch.Tensor],
                    exp_avg_sq: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor] | None) -> str | None:
    """Why :func:`adam_pull` must not be called with these operands, else None.

    Every operand must be :func:`usable`, of the first parameter's dtype, with
    its parameter's element count, and each list as long as ``params``.
    """
    if not params:
        return None
    dtype = params[0].dtype
    roles = [("param", params), ("grad", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if anchors is not None:
        roles.append(("anchor", anchors))
    for role, tensors in roles:
        if len(tensors) != len(params):
            return f"{len(tensors)} {role} tensors for {len(params)} params"
        for i, (t, p) in enumerate(zip(tensors, params)):
            if not (type(t) in _PLAIN and t.dtype is dtype and t.is_cpu and t.is_contiguous()
                    and t.numel() == p.numel()):
                what = (f"{type(t).__name__} {getattr(t, 'dtype', None)} on {getattr(t, 'device', None)}, "
                        f"contiguous={t.is_contiguous() if isinstance(t, torch.Tensor) else None}, "
                        f"{t.numel() if isinstance(t, torch.Tensor) else '?'} elements")
                return (f"{role} {i} is {what}; the kernel takes contiguous plain CPU tensors of {dtype} "
                        f"with {p.numel()} elements")
    if dtype not in NATIVE_DTYPES:
        return f"dtype {dtype}: the kernel takes {NATIVE_DTYPES}"
    return None


def _pointers(tensors: Sequence[torch.Tensor]) -> Any:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def adam_pull(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avg: Sequence[torch.Tensor],
              exp_avg_sq: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor] | None, coefficients: Sequence[float],
              *, beta1: float, beta2: float, eps: float, step_size: float, inv_sqrt_bc2: float,
              maximize: bool) -> None:
    """One Adam step and pull, in place, for tensors of one dtype sharing a step count.

    ``anchors=None`` is scratch (anchor 0); ``coefficients`` are the host
    float64 pull coefficients ``c`` (0 skips the pull); ``step_size`` and
    ``inv_sqrt_bc2`` come from :func:`decoupled_core.adam_coefficients`.

    Raises
    ------
    ValueError
        Where :func:`operand_problem` finds one (nothing is written then).
    RuntimeError
        Where the library did not load (:func:`native_status` says why).
    """
    why = operand_problem(params, grads, exp_avg, exp_avg_sq, anchors)
    if why is None and len(coefficients) != len(params):
        why = f"{len(coefficients)} coefficients for {len(params)} params"
    if why:
        raise ValueError(f"dualopt C kernel: {why}")
    lib = library()
    if lib is None:
        raise RuntimeError(f"dualopt C kernel: {native_status()['reason']}")
    n = len(params)
    if n == 0:
        return
    k = _AdamCoefficients(beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, inv_sqrt_bc2)
    lib.dualopt_adam_pull(_pointers(params), _pointers(grads), _pointers(exp_avg), _pointers(exp_avg_sq),
                          _pointers(anchors) if anchors is not None else None,
                          (ctypes.c_int64 * n)(*[p.numel() for p in params]), (ctypes.c_double * n)(*coefficients),
                          n, ctypes.byref(k), int(maximize), int(params[0].dtype == torch.float64),
                          torch.get_num_threads())
