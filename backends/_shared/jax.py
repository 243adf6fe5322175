"""The non-finite check of every jax-based adapter (Optax, and Keras on the jax backend): one per framework.

The core's ``all(isfinite(g))`` is exact but, compiled by XLA:CPU, writes a
boolean array the size of each gradient before reducing it; these variants read
each gradient once and give the same answer (``tests/optax/test_optax_step.py``
compares all three with the core's check).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

__all__ = ["all_finite", "all_finite_cpu", "all_finite_one_pass"]


def all_finite(grads: Sequence[Any], *, count: Any = None) -> Any:
    """One 0-d bool array: every element of every gradient is finite (the core's ``all_finite``), and
    ``count`` (an optimizer's 0-d step count, optional) is not negative.

    Exact on every platform, and one read of each gradient (the whole cost of
    ``nonfinite="skip"``, so it is kept small):

    - :func:`all_finite_one_pass` (GPU, TPU): ``isfinite(sum(g - g))``.
    - CPU (:func:`all_finite_cpu`): the plain ``sum(g)``, which XLA:CPU reduces
      about twice as fast as ``sum(g - g)``, with the one-pass check as an exact
      fallback when a sum is not finite.

    The per-leaf results (and the count's, as one more value: NaN when it is
    negative) are stacked and reduced once, so that the update's selects read
    one scalar: a chain of per-leaf ``and`` operations is fused by XLA into
    every select, which makes compile time quadratic in the number of leaves.
    """
    grads = [g for g in grads if g.size]
    extra = [] if count is None else [jnp.where(count >= 0, jnp.float32(0.0), jnp.float32(jnp.nan))]
    if not grads and not extra:
        return jnp.asarray(True)
    # Chosen when the program is lowered for its platform: the CPU path uses a lax.cond, which
    # XLA:GPU would run by copying the predicate to the host and waiting for it.
    return jax.lax.platform_dependent(grads, extra, cpu=all_finite_cpu, default=all_finite_one_pass)


def _accumulator(g: Any) -> Any:
    return jnp.promote_types(g.dtype, jnp.float32)  # float16/bfloat16 sums would overflow at 65504 / 3.4e38


def all_finite_one_pass(grads: Sequence[Any], extra: Sequence[Any] = ()) -> Any:
    """``isfinite(sum(g - g))`` over every gradient (and every float32 value of ``extra``): ``g - g`` is +0 for a
    finite element and NaN for NaN or +-Inf, so each sum is 0 or NaN, exactly and without overflow."""
    sums = [jnp.sum(g - g, dtype=_accumulator(g)).astype(jnp.float32) for g in grads]
    return jnp.all(jnp.isfinite(jnp.stack(sums + list(extra))))


def all_finite_cpu(grads: Sequence[Any], extra: Sequence[Any] = ()) -> Any:
    """A finite ``sum(g)`` proves every element of ``g`` finite (NaN and +-Inf reach the sum whatever the
    order of addition); a non-finite sum is a non-finite element or, rarely, an overflow of finite ones, and
    only then is :func:`all_finite_one_pass` computed (under a ``lax.cond``)."""
    sums = jnp.stack([jnp.sum(g, dtype=_accumulator(g)).astype(jnp.float32) for g in grads] + list(extra))
    return jax.lax.cond(jnp.all(jnp.isfinite(sums)), lambda *a: jnp.asarray(True), all_finite_one_pass, grads,
                        list(extra))
