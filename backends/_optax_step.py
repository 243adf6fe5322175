"""The update of :func:`dualopt.optax.dualopt` on flat lists of leaves (pure, jittable).

Per leaf it calls the core's :func:`~decoupled_core.adam_pre_weight`,
:func:`~decoupled_core.sgd_pre_weight` and :func:`~decoupled_core.pull` with
``xp=jax.numpy``, so the IEEE operations and their order are the spec's. The
only scalar that is computed differently is the Adam bias correction, because
the step count is traced under ``jax.jit`` (see :func:`adam_scalars`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from decoupled_core import all_finite as core_all_finite
from decoupled_core import AdamState, SGDState, adam_pre_weight, compute_dtype, pull, pull_coefficient, sgd_pre_weight
from decoupled_core.coefficients import AdamCoefficients

from ._optax_config import LeafConfig

__all__ = ["adam_scalars", "x64_enabled", "step_leaves", "all_finite"]


def x64_enabled() -> bool:
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def _bias_correction_f32(beta: Any, t: Any) -> Any:
    """``1 - beta**t`` accurate to a few float32 ulps, as ``-expm1(t * log(beta))``.

    Without x64 the direct ``1 - beta**t`` rounds ``beta`` to float32 first:
    for ``beta=0.999`` that is a 1.3e-5 relative error in ``1 - beta`` (1e-4
    for 0.9999), which Adam's denominator inherits. ``log(beta)`` is computed
    on the host in float64 when ``beta`` is a number.
    """
    tf = t.astype(jnp.float32)
    if isinstance(beta, (int, float)):
        if beta == 0.0:
            return jnp.ones_like(tf)  # 0**t == 0 for t >= 1
        return -jnp.expm1(tf * math.log(beta))
    return -jnp.expm1(tf * jnp.log(jnp.asarray(beta, jnp.float32)))


def _power(beta: Any, t: Any) -> Any:
    """``beta**t`` as XLA's float ``pow``: eager ``jnp.power`` with a concrete integer exponent
    switches to repeated squaring, which differs from the host's ``**`` in the last bit."""
    b = jnp.asarray(beta, jnp.float64 if isinstance(beta, (int, float)) else None)
    return jax.lax.pow(b, jnp.astype(t, b.dtype))


def adam_scalars(lr: Any, beta1: Any, beta2: Any, t: Any) -> AdamCoefficients:
    """``step_size = lr / (1 - beta1**t)`` and ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)`` for a traced ``t``.

    With x64 enabled this is :func:`decoupled_core.adam_coefficients`'s op
    sequence in float64, and equals the core's host values bit for bit, eagerly
    and under jit (tested for t up to 3000): ``beta**t`` is XLA's float ``pow``
    (see :func:`_power`) and an optimization barrier keeps XLA from rewriting
    ``1 / sqrt(x)`` as ``rsqrt(x)``, which differs in the last bit. Without x64
    the scalars are float32, computed with :func:`_bias_correction_f32`
    (within 3 float32 ulps of the core's float64 values rounded to float32).
    """
    if x64_enabled():
        bias_correction1 = 1.0 - _power(beta1, t)
        bias_correction2 = 1.0 - _power(beta2, t)
    else:
        bias_correction1 = _bias_correction_f32(beta1, t)
        bias_correction2 = _bias_correction_f32(beta2, t)
    return AdamCoefficients(lr / bias_correction1, 1.0 / jax.lax.optimization_barrier(jnp.sqrt(bias_correction2)))


def _key(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) else ("id", id(v))


def step_leaves(configs: Sequence[LeafConfig], params: Sequence[Any], grads: Sequence[Any], mu: Sequence[Any],
                nu: Sequence[Any], anchors: Sequence[Any], *, lr: Any, t: Any) -> tuple[list, list, list]:
    """New params (param dtype), mu and nu (compute dtype) for every leaf; ``t`` counts this step."""
    scalars: dict[Any, AdamCoefficients] = {}  # one set of bias corrections per (b1, b2)
    new_p, new_mu, new_nu = [], [], []
    for cfg, p, g, m, v, a in zip(configs, params, grads, mu, nu, anchors):
        hp = cfg.hp
        dt = compute_dtype(p.dtype, jnp)
        theta = jnp.astype(p, dt)
        grad = jnp.astype(g, dt)
        if hp.direction == "adam":
            k = (_key(hp.beta1), _key(hp.beta2))
            if k not in scalars:
                scalars[k] = adam_scalars(lr, hp.beta1, hp.beta2, t)
            sc = scalars[k]
            pre_weight, st = adam_pre_weight(theta, grad, AdamState(m, v), beta1=hp.beta1, beta2=hp.beta2,
                                             eps=hp.eps, step_size=sc.step_size, inv_sqrt_bc2=sc.inv_sqrt_bc2, xp=jnp)
            new_mu.append(st.exp_avg)
            new_nu.append(st.exp_avg_sq)
        else:
            pre_weight, st = sgd_pre_weight(theta, grad, SGDState(m), lr=lr, momentum=hp.momentum,
                                            nesterov=hp.nesterov, xp=jnp)
            new_mu.append(st.momentum_buffer)
            new_nu.append(v)
        c = pull_coefficient(lr, cfg.rate)
        if isinstance(c, float) and c == 0.0:
            new_theta = pre_weight  # host-known c == 0: the spec skips the pull
        else:
            new_theta = pull(pre_weight, a if hp.paradigm == "finetune" else None, c, xp=jnp)
        new_p.append(jnp.astype(new_theta, p.dtype))
    return new_p, new_mu, new_nu


def all_finite(grads: Sequence[Any]) -> Any:
    """One 0-d bool array: every element of every gradient is finite (the core's check)."""
    return jnp.asarray(core_all_finite(list(grads), xp=jnp))
