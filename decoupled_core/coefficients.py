"""Scalar coefficients of one step, computed once per step and tensor group.

The spec fixes them as float64 values computed on the host with Python's
``**`` (C ``pow(double, double)``), ``/`` and :func:`math.sqrt`; each is
rounded to the parameter's compute dtype only when it multiplies an array.
Inside a compiled program (``jax.jit``, a Keras train step) the same functions
run on traced 0-d arrays instead; the spec's tolerance policy covers that.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from ._xp import host_sqrt, is_scalar, namespace_of

__all__ = ["AdamCoefficients", "adam_coefficients", "bias_correction", "pull_coefficient"]


class AdamCoefficients(NamedTuple):
    """``step_size = lr / (1 - beta1**t)`` and ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)``."""

    step_size: Any
    inv_sqrt_bc2: Any


def adam_coefficients(lr: Any, beta1: Any, beta2: Any, step: Any, *, xp: Any = None, dtype: Any = None,
                      barrier: Callable[[Any], Any] | None = None) -> AdamCoefficients:
    """Bias-corrected Adam scalars for step ``t = step`` (1-based).

    Parameters
    ----------
    lr, beta1, beta2 : float or 0-d array
        eta_t and the betas (arrays when traced).
    step : int or 0-d array
        t. An int gives the spec's host float64 values.
    xp : namespace, optional
        Needed only when ``step`` or ``lr`` is a traced 0-d array of a
        namespace that array-api-compat does not cover (the Keras adapter's
        ``keras.ops`` shim); it is resolved from the arrays otherwise.
    dtype : float dtype of ``xp``, optional
        For a traced ``step``: compute the bias corrections with
        :func:`bias_correction` in this dtype. ``None``: ``1 - beta**step`` in
        the namespace's own promotion.
    barrier : callable, optional
        Applied to ``sqrt(1 - beta2**t)`` before its reciprocal is taken, so
        that a compiler cannot fuse the two into ``rsqrt``, which differs from
        the host's ``1 / math.sqrt`` in the last bit (jax:
        ``jax.lax.optimization_barrier``).

    Examples
    --------
    >>> c = adam_coefficients(1e-3, 0.9, 0.999, 1)
    >>> round(c.step_size, 12), round(c.inv_sqrt_bc2, 6)
    (0.01, 31.622777)
    """
    if dtype is not None and not is_scalar(step):
        xp = xp or namespace_of(step)
        bias_correction1 = bias_correction(beta1, step, dtype=dtype, xp=xp)
        bias_correction2 = bias_correction(beta2, step, dtype=dtype, xp=xp)
    else:
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
    root = host_sqrt(bias_correction2, xp=xp)
    return AdamCoefficients(lr / bias_correction1, 1.0 / (root if barrier is None else barrier(root)))


def bias_correction(beta: Any, step: Any, *, dtype: Any, xp: Any) -> Any:
    """``1 - beta**t`` for a traced step ``t`` (a 0-d integer array), computed on the device in ``dtype``.

    float64: ``1 - pow(beta, t)`` with ``beta`` (a host number: as float64;
    a traced one in its own dtype) and ``t`` as floats, the host's expression
    (XLA's ``pow`` gives the host's bits, tested to t = 123457).
    float32: ``-expm1(t * log(beta))``, within a few float32 ulps of the
    float64 value; the direct ``1 - beta**t`` would round ``beta`` to float32
    first, a 1.3e-5 relative error in ``1 - beta`` for ``beta = 0.999``
    (1e-4 for 0.9999), which Adam's denominator inherits. ``log(beta)`` of a
    host ``beta`` is taken on the host in float64.

    Examples
    --------
    >>> import numpy as np
    >>> float(bias_correction(0.5, np.asarray(2), dtype=np.float32, xp=np))
    0.75
    """
    if xp.finfo(dtype).bits >= 64:
        b = xp.asarray(beta, dtype=dtype) if is_scalar(beta) else beta
        return 1.0 - xp.pow(b, xp.astype(step, b.dtype))
    t = xp.astype(step, dtype)
    if is_scalar(beta):
        if beta == 0.0:
            return xp.ones_like(t)  # 0**t == 0 for t >= 1
        return -xp.expm1(t * math.log(beta))
    return -xp.expm1(t * xp.log(xp.astype(xp.asarray(beta), dtype)))


def pull_coefficient(lr: Any, rate: Any, *, xp: Any = None) -> Any:
    """``c = lr * rho`` clipped to ``[0, 1]``.

    Construction rejects a known ``lr * rho > 1``; a schedule that pushes it
    past 1 later is clipped, which puts the tensor on its anchor (up to the
    rounding of ``pre - anchor``).
    A host ``rate`` of exactly 0 gives the host 0.0 even when ``lr`` is traced
    (spec 4.2: c is then known to be 0 and the pull is skipped).

    Examples
    --------
    >>> pull_coefficient(0.1, 0.5)
    0.05
    >>> pull_coefficient(2.0, 1.0)
    1.0
    """
    if is_scalar(rate) and rate == 0.0:
        return 0.0
    c = lr * rate
    if is_scalar(c):
        return min(max(float(c), 0.0), 1.0)
    return (xp or namespace_of(c)).clip(c, 0.0, 1.0)
