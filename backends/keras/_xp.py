"""The few Array API names the core needs, on ``keras.ops``.

array-api-compat covers numpy, torch and jax but not TensorFlow, and inside a
Keras train step the arrays are whatever the backend traces. The core's rule
(:mod:`decoupled_core.rule`) uses arithmetic operators plus the names below, so
this namespace lets ``dualopt.keras`` call :func:`decoupled_core.step_tensor`
on every Keras backend: the core's operations, in the core's order.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from keras import ops
from keras.backend import standardize_dtype

__all__ = ["KERAS_XP"]

_FLOAT_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def _finfo(dtype: Any) -> SimpleNamespace:
    name = standardize_dtype(dtype)
    if name not in _FLOAT_BITS:
        raise TypeError(f"dtype={name!r} is not a floating-point dtype DualOpt supports {tuple(_FLOAT_BITS)}")
    return SimpleNamespace(bits=_FLOAT_BITS[name])


def _astype(x: Any, dtype: Any, copy: bool = False) -> Any:
    y = ops.cast(x, standardize_dtype(dtype))
    return ops.copy(y) if copy else y


class _KerasNamespace:
    """``xp`` for :mod:`decoupled_core` on ``keras.ops`` (dtypes are Keras dtype strings)."""

    float32 = "float32"
    float64 = "float64"
    finfo = staticmethod(_finfo)
    astype = staticmethod(_astype)
    sqrt = staticmethod(ops.sqrt)
    clip = staticmethod(ops.clip)
    all = staticmethod(ops.all)
    isfinite = staticmethod(ops.isfinite)
    logical_and = staticmethod(ops.logical_and)


KERAS_XP = _KerasNamespace()
