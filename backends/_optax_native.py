"""The optional C kernels of :mod:`dualopt.optax` (``native/dualopt_xla.c``), called as XLA custom calls.

On a model of many small tensors a jitted Optax step on CPU costs per kernel and
per buffer, not per byte: XLA compiles each tensor's Adam step into three kernels,
and the non-finite check adds a reduction per tensor. ``native/dualopt_xla.c``
steps a group of small tensors in one custom call (one pass over each) and checks
the gradients of all of them in another. Its arithmetic is ``dualopt_kernels.h``'s,
shared with the torch kernel: the spec's, operation for operation, compiled
without FMA contraction, so it equals :func:`decoupled_core.step_tensor` evaluated
with numpy bit for bit, subnormals included (``tests/optax/test_optax_native.py``).

Where it runs: Adam leaves of at most :data:`NATIVE_MAX_SIZE` elements whose
param, gradient and state are all float32 or all float64, when JAX's default
backend is the CPU with a single device (a sharded computation keeps XLA's own
kernels, which the partitioner understands), and only in the program lowered for
the CPU (``jax.lax.platform_dependent``). Larger leaves stay with XLA, whose
kernels are multi-threaded. ``DUALOPT_NATIVE=0``, no C compiler, or a build that
fails changes nothing but speed; :func:`native_status` says which case holds.

The library is compiled on first use with the system C compiler against the FFI
header that jaxlib ships (``jax.ffi.include_dir()``), and cached
(:mod:`dualopt._native_build`); a new jaxlib header builds anew.

Transformations: differentiating through the update (``jax.grad``, ``jax.jvp``)
uses the derivative of the same step written with XLA's operations; ``jax.vmap``
maps the custom calls one batch member at a time. ``jax.export`` refuses custom
calls that are not in its list of stable ones, so export a program traced with
``DUALOPT_NATIVE=0`` or inside :func:`disabled` (a program lowered for another
platform than the CPU never calls the kernels).

Examples
--------
>>> from dualopt._optax_native import native_status
>>> native_status()["enabled"] in (True, False)
True
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _native_build
from ._optax_state import PACK_MAX_SIZE

__all__ = ["NATIVE_MAX_SIZE", "CHUNK", "PULL_NONE", "PULL_ZERO", "PULL_ANCHOR", "library", "native_status", "usable",
           "disabled", "all_finite", "adam"]

_SOURCE = _native_build.NATIVE_DIR / "dualopt_xla.c"
_ABI = 1  # DUALOPT_XLA_ABI in the C file
_TARGETS = ("dualopt_xla_all_finite", "dualopt_xla_adam_updates", "dualopt_xla_adam_params")

#: Adam leaves of at most this many elements take the C kernel; their finetune anchors are always packed.
NATIVE_MAX_SIZE = PACK_MAX_SIZE
#: Tensors per custom call: one call of thousands of operands makes XLA's compile time explode.
CHUNK = 64
#: Pull kinds (DUALOPT_PULL_* in dualopt_kernels.h).
PULL_NONE, PULL_ZERO, PULL_ANCHOR = 0, 1, 2
#: Columns of the coefficient table (COL_* in dualopt_xla.c).
COLUMNS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2", "c")

_off = threading.local()


def _build() -> Path:
    return _native_build.build(_SOURCE, _native_build.compile_flags(openmp=False),
                               includes=[Path(jax.ffi.include_dir())])


def _load() -> tuple[ctypes.CDLL, Path]:
    path = _build()
    lib = ctypes.CDLL(str(path))
    if lib.dualopt_xla_abi() != _ABI:
        raise OSError(f"{path} has ABI {lib.dualopt_xla_abi()}, expected {_ABI}")
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib, path


_library = _native_build.Library(_load)
library = _library.get  # built and registered on the first call
native_status = _library.status


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Trace without the C kernels in this thread (XLA's kernels only), e.g. for ``jax.export``.

    Programs already compiled keep what they were traced with.
    """
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def usable() -> bool:
    """Whether a program traced now may call the kernels: loaded, not :func:`disabled`, one CPU device."""
    if getattr(_off, "on", False) or library() is None:
        return False
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _chunks(n: int) -> list[range]:
    return [range(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def all_finite(grads: Sequence[Any]) -> Any:
    """A 0-d bool array: every element of every gradient (float32/float64, any shapes) is finite."""
    flags = [jax.ffi.ffi_call("dualopt_xla_all_finite", jax.ShapeDtypeStruct((), jnp.int32),
                              vmap_method="sequential")(*[grads[i] for i in r]) for r in _chunks(len(grads))]
    return jnp.stack(flags).min() != 0 if len(flags) > 1 else flags[0] != 0


def _column(values: Sequence[Any], dtype: Any) -> Any:
    """One column of the coefficient table, each entry rounded once to ``dtype`` (as the XLA path rounds it)."""
    if all(isinstance(v, (int, float)) for v in values):
        return np.asarray(values, dtype=dtype)
    first = values[0]
    if all(v is first for v in values):
        return jnp.broadcast_to(jnp.astype(jnp.asarray(first), dtype), (len(values),))
    return jnp.stack([jnp.astype(jnp.asarray(v), dtype) for v in values])


def adam(params: Sequence[Any], grads: Sequence[Any], mu: Sequence[Any], nu: Sequence[Any],
         coefficients: Sequence[dict[str, Any]], kinds: Sequence[int], offsets: Sequence[int], packed: Any,
         ok: Any, *, updates: bool, reference: Callable[..., Any]) -> tuple[list, list, list]:
    """One Adam step and pull for tensors of one dtype (float32 or float64); ``(out, mu, nu)`` per tensor.

    ``coefficients[i]`` maps each name of :data:`COLUMNS` to a host number or a
    0-d array (tensor ``i``'s value in the core's words); ``kinds[i]`` is its
    pull (``PULL_*``) and ``offsets[i]`` the offset of its anchor in ``packed``
    (the 1-D packed anchors of this dtype; any 1-D array of the dtype when there
    are none). ``ok`` (0-d bool, or None for no check) false skips the step:
    moments unchanged and ``out`` -0.0 (``updates=True``) or the param. ``out``
    is ``new - param`` with ``updates=True``, else the new param.

    ``reference(layout, updates, ok32, table, packed, params, grads, mu, nu)``
    is the same step with XLA's operations; its derivative is the kernel's
    (``jax.jvp``, ``jax.grad`` through the update).
    """
    dtype = params[0].dtype
    ok32 = jnp.ones((), jnp.int32) if ok is None else jnp.asarray(ok, jnp.int32)
    columns = [_column([c[name] for c in coefficients], dtype) for name in COLUMNS]
    stack = np.stack if all(isinstance(c, np.ndarray) for c in columns) else jnp.stack
    table = stack(columns, axis=1)  # a constant of the program unless a coefficient is traced
    layout = tuple((int(k), int(o)) for k, o in zip(kinds, offsets))
    out, new_mu, new_nu = _kernel(reference, layout, updates, ok32, table, packed, tuple(params), tuple(grads),
                                  tuple(mu), tuple(nu))
    return list(out), list(new_mu), list(new_nu)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _kernel(reference: Callable[..., Any], layout: tuple, updates: bool, ok32: Any, table: Any, packed: Any,
            params: tuple, grads: tuple, mu: tuple, nu: tuple) -> tuple[tuple, tuple, tuple]:
    dtype = params[0].dtype
    rows = np.asarray(layout, dtype=np.int32).reshape(-1, 2)
    target = "dualopt_xla_adam_updates" if updates else "dualopt_xla_adam_params"
    out, new_mu, new_nu = [], [], []
    for r in _chunks(len(params)):
        operands = [ok32, table[r.start:r.stop], rows[r.start:r.stop], packed]
        results, aliases = [], {}
        for j, i in enumerate(r):
            operands += [params[i], grads[i], mu[i], nu[i]]
            aliases[len(operands) - 2] = 3 * j + 1  # m and v are updated in place
            aliases[len(operands) - 1] = 3 * j + 2
            if not updates:
                aliases[len(operands) - 4] = 3 * j  # so is the param when the result is the new param
            shape = jax.ShapeDtypeStruct(params[i].shape, dtype)
            results += [shape, shape, shape]
        res = jax.ffi.ffi_call(target, results, input_output_aliases=aliases, vmap_method="sequential")(*operands)
        out += res[0::3]
        new_mu += res[1::3]
        new_nu += res[2::3]
    return tuple(out), tuple(new_mu), tuple(new_nu)


@_kernel.defjvp
def _kernel_jvp(reference: Callable[..., Any], layout: tuple, updates: bool, primals: tuple,
                tangents: tuple) -> tuple[Any, Any]:
    # The primal comes from the kernel itself, so a differentiated step keeps its values.
    _, tangents_out = jax.jvp(functools.partial(reference, layout, updates), primals, tangents)
    return _kernel(reference, layout, updates, *primals), tangents_out
