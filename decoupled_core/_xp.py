"""Array-namespace plumbing: resolve ``xp`` once at the public boundary, pass it down."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["namespace_of", "is_scalar", "compute_dtype", "as_coefficient"]


def namespace_of(*arrays: Any) -> Any:
    """The Array API namespace of ``arrays`` (via array-api-compat)."""
    import array_api_compat

    return array_api_compat.array_namespace(*[a for a in arrays if a is not None and not is_scalar(a)])


def is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compute_dtype(dtype: Any, xp: Any) -> Any:
    """The dtype state and arithmetic use for parameters of ``dtype``.

    Sub-32-bit floats (float16, bfloat16) are widened to float32 so that
    moments and anchors do not lose the small increments Adam accumulates;
    float32 and float64 compute in their own precision.
    """
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def as_coefficient(c: Any, dtype: Any, xp: Any) -> Any:
    """A host scalar stays a Python float (rounded once by the array op); a traced
    0-d array is cast to ``dtype`` so that it never promotes the computation."""
    if is_scalar(c):
        return float(c)
    return xp.astype(c, dtype)


def host_sqrt(x: Any, *, xp: Any = None) -> Any:
    """``math.sqrt`` on a host scalar; ``xp.sqrt`` on a traced 0-d array (``xp`` defaults to its namespace)."""
    if is_scalar(x):
        return math.sqrt(x)
    return (xp or namespace_of(x)).sqrt(x)
