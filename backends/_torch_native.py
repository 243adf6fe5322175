"""The optional C kernels of :mod:`dualopt.torch` (``native/dualopt_cpu.c``): build, load, call.

The finetune step reads one tensor more than AdamW (the anchor). torch's fused
Adam kernel cannot read it, and a second multi-tensor pass for the pull costs
12 bytes per element more, about 1.4x ``AdamW(fused=True)`` on large tensors.
``native/dualopt_cpu.c`` does the spec's Adam step and the pull in one pass
(32 bytes per element against AdamW's 28) and scans gradients for NaN/Inf on
torch's threads. Its arithmetic is the core's, operation for operation, compiled
without FMA contraction: on float32 and float64 it equals
:func:`decoupled_core.step_tensor` evaluated with numpy bit for bit
(``tests/torch/test_torch_native.py`` asserts it).

The C file is compiled on first use with the system C compiler into a
cache directory, keyed by its sources and flags (:mod:`dualopt._native_build`);
the build takes well under a second. Without a compiler, on a platform
where the build or the load fails, or with ``DUALOPT_NATIVE=0``, nothing
changes but speed: the optimizer keeps its multi-tensor path.
:func:`native_status` says which case holds.

Examples
--------
>>> from dualopt._torch_native import native_status
>>> native_status()["enabled"] in (True, False)
True
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import torch

from . import _native_build

__all__ = ["NATIVE_DTYPES", "library", "native_status", "adam_pull", "all_finite"]

_SOURCE = _native_build.NATIVE_DIR / "dualopt_cpu.c"
_ABI = 1  # DUALOPT_NATIVE_ABI in the C file
#: The dtypes the C kernels take (as they are; float16/bfloat16 go through float32 working copies).
NATIVE_DTYPES = (torch.float32, torch.float64)


class _AdamCoefficients(ctypes.Structure):
    # Same order as adam_coefficients in dualopt_cpu.c; host float64, rounded in C to the dtype.
    _fields_ = [(name, ctypes.c_double) for name in
                ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2")]


def _build() -> Path:
    # Tried first: OpenMP threads. libgomp is already loaded by torch (torch/lib/libgomp.so.1 in the
    # CPU wheels), so the loader resolves this library's libgomp.so.1 to the same runtime and the
    # kernels share torch's thread pool; a wheel whose libgomp has another name gets a second pool,
    # correct but slower. Without OpenMP the build is serial.
    try:
        return _native_build.build(_SOURCE, _native_build.compile_flags(openmp=True))
    except OSError:
        return _native_build.build(_SOURCE, _native_build.compile_flags(openmp=False))


def _load() -> tuple[ctypes.CDLL, Path]:
    path = _build()
    lib = ctypes.CDLL(str(path))
    if lib.dualopt_abi() != _ABI:
        raise OSError(f"{path} has ABI {lib.dualopt_abi()}, expected {_ABI}")
    vp = ctypes.c_void_p
    lib.dualopt_adam_pull.restype = None
    lib.dualopt_adam_pull.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int64, ctypes.POINTER(_AdamCoefficients),
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.dualopt_all_finite.restype = ctypes.c_int
    lib.dualopt_all_finite.argtypes = [vp, vp, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return lib, path


_library = _native_build.Library(_load)
_state = _library.state  # lib and reason (tests set lib to None to run the fallback)
library = _library.get
native_status = _library.status


def usable(t: torch.Tensor) -> bool:
    """Whether the C kernels may read and write ``t``'s memory directly.

    A plain CPU tensor (or Parameter), contiguous, float32/float64: subclasses
    such as DTensor, or the fake tensors torch.compile traces with, have no
    memory of their own to hand to C (the caller also checks that it is not
    being traced).
    """
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype in NATIVE_DTYPES
            and t.is_contiguous())


def _pointers(tensors: Sequence[torch.Tensor]) -> Any:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def adam_pull(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avg: Sequence[torch.Tensor],
              exp_avg_sq: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor] | None, coefficients: Sequence[float],
              *, beta1: float, beta2: float, eps: float, step_size: float, inv_sqrt_bc2: float,
              maximize: bool) -> None:
    """One Adam step and pull, in place, for tensors of one dtype sharing a step count.

    ``anchors=None`` is scratch (anchor 0); ``coefficients`` are the host
    float64 pull coefficients ``c`` (0 skips the pull); ``step_size`` and
    ``inv_sqrt_bc2`` come from :func:`decoupled_core.adam_coefficients`. Every
    tensor must satisfy :func:`usable`, with the same dtype and the element
    count of its parameter; the caller checks (this function trusts it).
    """
    lib = library()
    n = len(params)
    k = _AdamCoefficients(beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size, inv_sqrt_bc2)
    lib.dualopt_adam_pull(_pointers(params), _pointers(grads), _pointers(exp_avg), _pointers(exp_avg_sq),
                          _pointers(anchors) if anchors is not None else None,
                          (ctypes.c_int64 * n)(*[p.numel() for p in params]), (ctypes.c_double * n)(*coefficients),
                          n, ctypes.byref(k), int(maximize), int(params[0].dtype == torch.float64),
                          torch.get_num_threads())


def all_finite(grads: Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``grads`` (one dtype, each :func:`usable`) is finite."""
    lib = library()
    return bool(lib.dualopt_all_finite(_pointers(grads), (ctypes.c_int64 * len(grads))(*[g.numel() for g in grads]),
                                       len(grads), int(grads[0].dtype == torch.float64), torch.get_num_threads()))
