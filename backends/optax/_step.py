"""The update of :func:`dualopt.optax.dualopt` on flat lists of leaves (pure, jittable).

The pull is the core's :func:`~decoupled_core.pull`, called with
``xp=jax.numpy``. The direction is the core's
:func:`~decoupled_core.adam_pre_weight` / :func:`~decoupled_core.sgd_pre_weight`
op sequence, repeated here with one change that costs no arithmetic: under
``nonfinite="skip"`` the new moments are selected (new where every gradient is
finite, old otherwise) *before* the pre-weight reads them. XLA then writes each
moment once and the parameter update reads that buffer, as in
``optax.adamw``; selecting after the core's function would make the parameter
update recompute the moments from the old ones, which the compiler keeps alive
with extra copies (about 1.6x the memory traffic on CPU). When the gradients are
finite the two are the same operations on the same values, so the result is
the spec's bit for bit (``tests/optax/test_optax_step.py`` compares them with
the core's functions). The only scalars computed differently are the Adam bias
corrections, because the step count is traced under ``jax.jit`` (see
:func:`adam_scalars`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from decoupled_core import compute_dtype, pull, pull_coefficient
from decoupled_core._xp import as_coefficient
from decoupled_core.coefficients import AdamCoefficients

from .._shared.jax import all_finite
from ._config import LeafConfig

__all__ = ["adam_scalars", "x64_enabled", "adam_pre_weight", "sgd_pre_weight", "step_leaves", "all_finite"]


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


def _select(ok: Any, new: Any, old: Any) -> Any:
    return new if ok is None else jnp.where(ok, new, old)


def adam_pre_weight(theta: Any, grad: Any, m: Any, v: Any, ok: Any, *, beta1: Any, beta2: Any, eps: Any,
                    step_size: Any, inv_sqrt_bc2: Any) -> tuple[Any, Any, Any]:
    """``(pre_weight, m, v)``: :func:`decoupled_core.adam_pre_weight`'s operations, moments selected by ``ok``.

    ``ok=None`` selects nothing. With ``ok`` false the returned moments are the
    old ones and the pre-weight is meaningless (the caller discards it).
    """
    c = lambda s: as_coefficient(s, m.dtype, jnp)  # noqa: E731
    m = _select(ok, c(beta1) * m + c(1.0 - beta1) * grad, m)
    v = _select(ok, c(beta2) * v + c(1.0 - beta2) * (grad * grad), v)
    denom = jnp.sqrt(v) * c(inv_sqrt_bc2) + c(eps)
    return theta - c(step_size) * (m / denom), m, v


def sgd_pre_weight(theta: Any, grad: Any, buf: Any, ok: Any, *, lr: Any, momentum: Any,
                   nesterov: bool) -> tuple[Any, Any]:
    """``(pre_weight, buf)``: :func:`decoupled_core.sgd_pre_weight`'s operations, buffer selected by ``ok``."""
    mu = as_coefficient(momentum, buf.dtype, jnp)
    buf = _select(ok, mu * buf + grad, buf)
    direction = grad + mu * buf if nesterov else buf
    return theta - as_coefficient(lr, buf.dtype, jnp) * direction, buf


def _bias_corrections(cache: dict, hp: Any, lr: Any, t: Any) -> AdamCoefficients:
    """:func:`adam_scalars` of ``hp``'s betas, computed once per step for every pair of betas in ``cache``."""
    k = (_key(hp.beta1), _key(hp.beta2))
    if k not in cache:
        cache[k] = adam_scalars(lr, hp.beta1, hp.beta2, t)
    return cache[k]


def _no_pull(c: Any) -> bool:
    """A pull coefficient known on the host to be 0: the spec skips the pull (``c * (pre - a)`` could be NaN)."""
    return isinstance(c, float) and c == 0.0


def step_leaves(configs: Sequence[LeafConfig], params: Sequence[Any], grads: Sequence[Any], mu: Sequence[Any],
                nu: Sequence[Any], anchors: Sequence[Any], *, lr: Any, t: Any, check: bool,
                output: str) -> tuple[list, list, list, Any]:
    """``(out, mu, nu, ok)`` for every leaf; ``t`` counts this step.

    ``anchors[i]`` is leaf ``i``'s anchor (finetune leaves) or None. ``out`` is
    ``new - param`` (``output="updates"``) or the new param (``"params"``), in
    the param's dtype; mu and nu are in the compute dtype. With ``check``,
    ``ok`` is a 0-d bool (every gradient finite), computed before anything is
    written, and where it is false every moment is the old one and ``out`` is
    ``-0.0`` (``x + -0.0 == x`` bit for bit, also for ``x == -0.0``) or the old
    param; without it ``ok`` is None.
    """
    ok = all_finite(grads) if check else None
    scalars: dict[Any, AdamCoefficients] = {}  # one set of bias corrections per (b1, b2)
    out, new_mu, new_nu = [], [], []
    for i in range(len(params)):
        cfg, p, g, m, v = configs[i], params[i], grads[i], mu[i], nu[i]
        hp = cfg.hp
        dt = compute_dtype(p.dtype, jnp)
        theta = jnp.astype(p, dt)
        grad = jnp.astype(g, dt)
        if hp.direction == "adam":
            sc = _bias_corrections(scalars, hp, lr, t)
            pre_weight, m, v = adam_pre_weight(theta, grad, m, v, ok, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                                               step_size=sc.step_size, inv_sqrt_bc2=sc.inv_sqrt_bc2)
        else:
            pre_weight, m = sgd_pre_weight(theta, grad, m, ok, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        new_mu.append(m)
        new_nu.append(v)
        c = pull_coefficient(lr, cfg.rate)
        if _no_pull(c):
            new_theta = pre_weight
        else:
            new_theta = pull(pre_weight, anchors[i] if hp.paradigm == "finetune" else None, c, xp=jnp)
        new = jnp.astype(new_theta, p.dtype)
        if output == "updates":
            out.append(new - p if ok is None else jnp.where(ok, new - p, jnp.asarray(-0.0, p.dtype)))
        else:
            out.append(new if ok is None else jnp.where(ok, new, p))
    return out, new_mu, new_nu, ok
