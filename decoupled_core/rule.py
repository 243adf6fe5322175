"""The per-tensor update rule: direction, pre-weight, pull (spec section "The rule").

Every function is pure: it takes arrays and returns new arrays, so the same
code runs on numpy, array-api-strict, torch and (traced) jax arrays. Adapters
write the results back (``copy_``, ``assign``) in their own idiom.

The order of operations below *is* the spec's: an implementation that performs
the same IEEE operations in the same order gets the same bits.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from ._xp import as_coefficient, compute_dtype, namespace_of
from .coefficients import AdamCoefficients, adam_coefficients, pull_coefficient
from .hyperparams import HyperParams

__all__ = [
    "AdamState",
    "SGDState",
    "DirectionState",
    "init_direction_state",
    "init_anchor",
    "adam_pre_weight",
    "sgd_pre_weight",
    "pull",
    "step_tensor",
    "all_finite",
]


class AdamState(NamedTuple):
    """Adam moments: ``exp_avg`` (m) and ``exp_avg_sq`` (v), in the compute dtype."""

    exp_avg: Any
    exp_avg_sq: Any


class SGDState(NamedTuple):
    """Heavy-ball buffer b (zeros before the first step, so that b_1 = g_1)."""

    momentum_buffer: Any


DirectionState = AdamState | SGDState


def init_direction_state(param: Any, direction: str, *, xp: Any = None) -> DirectionState:
    """Zero state for ``direction`` in ``param``'s compute dtype.

    Examples
    --------
    >>> import numpy as np
    >>> s = init_direction_state(np.ones((2,), np.float16), "adam")
    >>> s.exp_avg.dtype, s.exp_avg_sq.shape
    (dtype('float32'), (2,))
    """
    xp = xp or namespace_of(param)
    dt = compute_dtype(param.dtype, xp)
    zeros = lambda: xp.zeros(param.shape, dtype=dt, device=_device(param, xp))  # noqa: E731
    if direction == "adam":
        return AdamState(zeros(), zeros())
    if direction == "sgd":
        return SGDState(zeros())
    raise ValueError(f"direction={direction!r} is invalid: expected one of ('adam', 'sgd').")


def init_anchor(param: Any, *, xp: Any = None) -> Any:
    """A copy of ``param`` in its compute dtype (lossless: widening only)."""
    xp = xp or namespace_of(param)
    return xp.astype(param, compute_dtype(param.dtype, xp), copy=True)


def _device(x: Any, xp: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


def _kept(keep: Any, new: Any, old: Any, xp: Any) -> Any:
    return new if keep is None else xp.where(keep, new, old)


def adam_pre_weight(param: Any, grad: Any, state: AdamState, *, beta1: Any, beta2: Any, eps: Any,
                    step_size: Any, inv_sqrt_bc2: Any, xp: Any, keep: Any = None) -> tuple[Any, AdamState]:
    """Adam direction and pre-weight, all in the compute dtype of ``state``.

    ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*(g*g)``;
    ``denom = sqrt(v)*inv_sqrt_bc2 + eps``; ``pre = theta - step_size*(m/denom)``.

    ``keep`` (a 0-d bool array, or None for "always") is the skip of spec
    section 5 done on the device: where it is false the moments stay the old
    ones and the pre-weight is meaningless (the caller keeps the old weight).
    The moments are selected *before* the pre-weight reads them, so a compiler
    writes each moment once and the weight update reads that buffer.
    """
    dt = state.exp_avg.dtype
    c = lambda s: as_coefficient(s, dt, xp)  # noqa: E731
    m = _kept(keep, c(beta1) * state.exp_avg + c(1.0 - beta1) * grad, state.exp_avg, xp)
    v = _kept(keep, c(beta2) * state.exp_avg_sq + c(1.0 - beta2) * (grad * grad), state.exp_avg_sq, xp)
    denom = xp.sqrt(v) * c(inv_sqrt_bc2) + c(eps)
    pre_weight = param - c(step_size) * (m / denom)
    return pre_weight, AdamState(m, v)


def sgd_pre_weight(param: Any, grad: Any, state: SGDState, *, lr: Any, momentum: Any, nesterov: bool,
                   xp: Any, keep: Any = None) -> tuple[Any, SGDState]:
    """Heavy-ball direction and pre-weight: ``b = mu*b + g``; ``u = g + mu*b`` (Nesterov) or ``b``;
    ``pre = theta - lr*u``. ``keep`` as in :func:`adam_pre_weight`."""
    dt = state.momentum_buffer.dtype
    mu = as_coefficient(momentum, dt, xp)
    buf = _kept(keep, mu * state.momentum_buffer + grad, state.momentum_buffer, xp)
    direction = grad + mu * buf if nesterov else buf
    pre_weight = param - as_coefficient(lr, dt, xp) * direction
    return pre_weight, SGDState(buf)


def pull(pre_weight: Any, anchor: Any, coefficient: Any, *, xp: Any) -> Any:
    """``theta = pre - c*(pre - a)``; ``anchor=None`` stands for a = 0 (then ``pre - c*pre``, the same bits).

    Examples
    --------
    >>> import numpy as np
    >>> pull(np.array([2.0]), np.array([1.0]), 0.25, xp=np).tolist()
    [1.75]
    >>> pull(np.array([2.0]), None, 0.25, xp=np).tolist()
    [1.5]
    """
    c = as_coefficient(coefficient, pre_weight.dtype, xp)
    if anchor is None:
        return pre_weight - c * pre_weight
    return pre_weight - c * (pre_weight - anchor)


def step_tensor(param: Any, grad: Any, state: DirectionState, anchor: Any, *, hp: HyperParams, lr: Any,
                step: Any, rate: Any, xp: Any = None, keep: Any = None,
                coefficients: AdamCoefficients | None = None) -> tuple[Any, DirectionState]:
    """One DualOpt step for one tensor; returns ``(new_param, new_state)``.

    Parameters
    ----------
    param, grad : array
        The tensor and its gradient (any float dtype; the gradient of a
        maximised objective must already be negated).
    state : AdamState or SGDState
        From :func:`init_direction_state`.
    anchor : array or None
        The finetune anchor (compute dtype); ignored unless the pull is active
        and the paradigm is ``"finetune"``.
    hp : HyperParams
        The tensor's group hyperparameters.
    lr : float or 0-d array
        eta_t.
    step : int or 0-d array
        t, counting this step (1 on the first update of this tensor).
    rate : float or 0-d array
        rho_l from :func:`decoupled_core.layers.pull_rate`.
    keep : 0-d bool array, optional
        As in :func:`adam_pre_weight`: where false the returned state is the
        old one and the returned param is meaningless (the caller keeps the
        old one).
    coefficients : AdamCoefficients, optional
        :func:`adam_coefficients` of ``(lr, hp.beta1, hp.beta2, step)``,
        when the caller computes them once for many tensors.

    Examples
    --------
    >>> import numpy as np
    >>> hp = HyperParams(direction="sgd", momentum=0.0, paradigm="finetune", rollback_max=1.0)
    >>> st = init_direction_state(np.zeros(1), "sgd")
    >>> p, st = step_tensor(np.array([1.0]), np.array([10.0]), st, np.array([1.0]), hp=hp, lr=0.1, step=1, rate=1.0)
    >>> p.tolist()   # pre-weight 0.0, pulled 10% of the way back to 1.0
    [0.1]
    """
    xp = xp or namespace_of(param, grad)
    dt = compute_dtype(param.dtype, xp)
    theta = xp.astype(param, dt)
    g = xp.astype(grad, dt)
    new_state: DirectionState
    if hp.direction == "adam":
        coeffs = coefficients or adam_coefficients(lr, hp.beta1, hp.beta2, step, xp=xp)
        pre_weight, new_state = adam_pre_weight(theta, g, cast(AdamState, state), beta1=hp.beta1, beta2=hp.beta2,
                                                eps=hp.eps, step_size=coeffs.step_size,
                                                inv_sqrt_bc2=coeffs.inv_sqrt_bc2, xp=xp, keep=keep)
    else:
        pre_weight, new_state = sgd_pre_weight(theta, g, cast(SGDState, state), lr=lr, momentum=hp.momentum,
                                               nesterov=hp.nesterov, xp=xp, keep=keep)
    c = pull_coefficient(lr, rate, xp=xp)
    if isinstance(c, float) and c == 0.0:
        new_theta = pre_weight
    else:
        new_theta = pull(pre_weight, anchor if hp.paradigm == "finetune" else None, c, xp=xp)
    return xp.astype(new_theta, param.dtype), new_state


def all_finite(grads: Any, *, xp: Any = None) -> Any:
    """True when every element of every gradient is finite (a bool, or a 0-d bool array when traced)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    xp = xp or namespace_of(*grads)
    flags = [xp.all(xp.isfinite(g)) for g in grads]
    out = flags[0]
    for f in flags[1:]:
        out = xp.logical_and(out, f)
    return out
