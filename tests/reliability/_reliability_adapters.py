"""How the reliability suite drives each adapter (torch and Optax in-process; Keras in its worker).

``construct_*`` build an optimizer the way a user would for one bad-input case
of :mod:`_reliability_cases` and return the error message (or None if the
adapter accepted the input). The Keras twin lives in ``_keras_worker.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from _reliability_cases import PARAM_SHAPES, BadInput, adapter_kwargs


def construct_torch(case: BadInput) -> str | None:
    import torch

    from dualopt.torch import DualOpt

    kw = adapter_kwargs(case, "torch")
    if "anchor" in kw:
        kw["anchor"] = [None if a is None else torch.from_numpy(a) for a in kw["anchor"]]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in PARAM_SHAPES]
    try:
        DualOpt(params, **kw)
    except Exception as e:  # the message is asserted on by the caller, whatever the type
        return f"{type(e).__name__}: {e}"
    return None


def construct_optax(case: BadInput) -> str | None:
    """``dualopt(...)`` then ``init`` on a list of two float32 leaves (validation may happen in either)."""
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    kw = adapter_kwargs(case, "optax")
    lr = kw.pop("learning_rate")
    params = [jnp.zeros(s, jnp.float32) for s in PARAM_SHAPES]
    try:
        dualopt(lr, **kw).init(params)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def error_text(result: str | None) -> tuple[str | None, str | None]:
    """``"Type: message"`` -> ``(type, message)``."""
    if result is None:
        return None, None
    kind, _, msg = result.partition(": ")
    return kind, msg


def bits(a: Any) -> np.ndarray:
    """The raw bytes of an array as unsigned ints (NaN payloads and -0.0 included)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a.view(np.uint8)


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))
