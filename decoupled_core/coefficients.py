"""Scalar coefficients of one step, computed once per step and tensor group.

The spec fixes them as float64 values computed on the host with Python's
``**`` (C ``pow(double, double)``), ``/`` and :func:`math.sqrt`; each is
rounded to the parameter's compute dtype only when it multiplies an array.
Inside a compiled program (``jax.jit``, a Keras train step) the same functions
run on traced 0-d arrays instead; the spec's tolerance policy covers that.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._xp import host_sqrt, is_scalar, namespace_of

__all__ = ["AdamCoefficients", "adam_coefficients", "pull_coefficient"]


class AdamCoefficients(NamedTuple):
    """``step_size = lr / (1 - beta1**t)`` and ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)``."""

    step_size: Any
    inv_sqrt_bc2: Any


def adam_coefficients(lr: Any, beta1: Any, beta2: Any, step: Any, *, xp: Any = None) -> AdamCoefficients:
    """Bias-corrected Adam scalars for step ``t = step`` (1-based).

    ``xp`` is only needed when ``step`` or ``lr`` is a traced 0-d array of a
    namespace that array-api-compat does not cover (the Keras adapter's
    ``keras.ops`` shim); it is resolved from the arrays otherwise.

    Examples
    --------
    >>> c = adam_coefficients(1e-3, 0.9, 0.999, 1)
    >>> round(c.step_size, 12), round(c.inv_sqrt_bc2, 6)
    (0.01, 31.622777)
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return AdamCoefficients(lr / bias_correction1, 1.0 / host_sqrt(bias_correction2, xp=xp))


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
