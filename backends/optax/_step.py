"""The update of :func:`dualopt.optax.dualopt` on flat lists of leaves (pure, jittable): the core's
:func:`~decoupled_core.step_tensor` per leaf, with ``xp=jax.numpy``.

Under ``nonfinite="skip"`` the core selects the new moments (``keep``) before
the pre-weight reads them, so XLA writes each moment once and the parameter
update reads that buffer, as in ``optax.adamw``. The Adam scalars are computed
once per step and pair of betas, on the device: the step count is traced.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from decoupled_core import AdamState, SGDState, adam_coefficients, step_tensor
from decoupled_core.coefficients import AdamCoefficients

from ._config import LeafConfig, hashable

__all__ = ["adam_scalars", "step_leaves"]


def adam_scalars(lr: Any, beta1: Any, beta2: Any, t: Any) -> AdamCoefficients:
    """:func:`decoupled_core.adam_coefficients` for a traced ``t``, in float64 where x64 is enabled (then the
    host's values bit for bit, eagerly and under jit), else in float32 (within 3 ulps of them)."""
    x64 = jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64
    return adam_coefficients(lr, beta1, beta2, t, xp=jnp, dtype=jnp.float64 if x64 else jnp.float32,
                             barrier=jax.lax.optimization_barrier)


def step_leaves(configs: Sequence[LeafConfig], params: Sequence[Any], grads: Sequence[Any], mu: Sequence[Any],
                nu: Sequence[Any], anchors: Sequence[Any], *, lr: Any, t: Any, keep: Any,
                output: str) -> tuple[list, list, list]:
    """``(out, mu, nu)`` for every leaf; ``t`` counts this step.

    ``anchors[i]`` is leaf ``i``'s anchor (finetune leaves) or None. ``out`` is
    ``new - param`` (``output="updates"``) or the new param (``"params"``), in
    the param's dtype; mu and nu are in the compute dtype. ``keep`` is None or
    a 0-d bool: where it is false every moment is the old one and ``out`` is
    ``-0.0`` (``x + -0.0 == x`` bit for bit, also for ``x == -0.0``) or the old
    param.
    """
    scalars: dict[Any, AdamCoefficients] = {}  # one set of bias corrections per (b1, b2)
    out, new_mu, new_nu = [], [], []
    for cfg, p, g, m, v, a in zip(configs, params, grads, mu, nu, anchors):
        hp = cfg.hp
        adam = hp.direction == "adam"
        coefficients = None
        if adam:
            k = (hashable(hp.beta1), hashable(hp.beta2))
            if k not in scalars:
                scalars[k] = adam_scalars(lr, hp.beta1, hp.beta2, t)
            coefficients = scalars[k]
        new, state = step_tensor(p, g, AdamState(m, v) if adam else SGDState(m), a, hp=hp, lr=lr, step=t,
                                 rate=cfg.rate, xp=jnp, keep=keep, coefficients=coefficients)
        new_mu.append(state[0])
        new_nu.append(state.exp_avg_sq if isinstance(state, AdamState) else v)
        if output == "updates":
            out.append(new - p if keep is None else jnp.where(keep, new - p, jnp.asarray(-0.0, p.dtype)))
        else:
            out.append(new if keep is None else jnp.where(keep, new, p))
    return out, new_mu, new_nu
