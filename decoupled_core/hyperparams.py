"""Hyperparameters of the DualOpt rule: defaults and the one shared validator.

Every adapter translates its ecosystem's argument names (``lr``/``betas``,
``learning_rate``/``b1``, ``beta_1``/``epsilon``) to the canonical names below
and calls :func:`validate`, passing ``names`` so that an error message quotes the
argument exactly as the user spelled it. The wording is therefore identical in
every framework: ``"<name>=<value> is invalid: expected <accepted>."``
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

__all__ = [
    "DIRECTIONS",
    "PARADIGMS",
    "NONFINITE_POLICIES",
    "DEFAULT_ROLLBACK_FRACTION",
    "HyperparameterError",
    "HyperParams",
    "invalid",
    "ACCEPTED",
    "accepted",
    "validate",
    "resolve_rollback_max",
    "dtype_name",
    "check_anchor",
    "WeightDecayWarning",
    "warn_finetune_weight_decay",
]

DIRECTIONS = ("adam", "sgd")
PARADIGMS = ("scratch", "finetune", "none")
NONFINITE_POLICIES = ("skip", "propagate")

#: Fraction of the way back to the anchor that the shallowest finetune layer
#: moves per step at the base learning rate when ``rollback_max`` is left as
#: ``None`` (OLOR's training scripts: ``lr0 * kappa_max = 0.01``).
DEFAULT_ROLLBACK_FRACTION = 0.01


class HyperparameterError(ValueError):
    """A hyperparameter is outside its accepted range (raised at construction)."""


def invalid(name: str, value: Any, accepted: str) -> HyperparameterError:
    """Build the error every adapter raises for a bad argument.

    Examples
    --------
    >>> str(invalid("eps", -1.0, "a finite float >= 0"))
    'eps=-1.0 is invalid: expected a finite float >= 0.'
    """
    return HyperparameterError(f"{name}={value!r} is invalid: expected {accepted}.")


_A01 = "a finite number in [0, 1)"
_NONNEG = "a finite float >= 0"

#: The ``<accepted>`` text of every canonical argument: the one place where the
#: shared wording of the valid range lives (adapters extend it with
#: :func:`accepted`, never rewrite it).
ACCEPTED: dict[str, str] = {
    "lr": _NONNEG,
    "direction": f"one of {DIRECTIONS}",
    "paradigm": f"one of {PARADIGMS}",
    "nonfinite": f"one of {NONFINITE_POLICIES}",
    "beta1": _A01,
    "beta2": _A01,
    "eps": _NONNEG,
    "momentum": _A01,
    "nesterov": "True or False",
    "weight_decay": _NONNEG,
    "rollback_max": f"{_NONNEG}, or None",
    "rollback_min": _NONNEG,
    "rollback_power": "a finite float > 0",
}


def accepted(key: str, also: Sequence[str] = ()) -> str:
    """The shared ``<accepted>`` text of canonical argument ``key``, plus any forms an adapter accepts besides.

    An adapter that legitimately takes more than the core's range (an Optax
    schedule, a Keras ``LearningRateSchedule``, a mapping of paradigms) names
    only the extra forms; the range itself and the way they are joined stay
    the core's, so the messages agree across adapters.

    Examples
    --------
    >>> accepted("lr")
    'a finite float >= 0'
    >>> str(invalid("learning_rate", "1e-3", accepted("lr", ("an optax schedule",))))
    "learning_rate='1e-3' is invalid: expected a finite float >= 0, or an optax schedule."
    """
    return ACCEPTED[key] + "".join(f", or {form}" for form in also)


@dataclass(frozen=True)
class HyperParams:
    """One parameter group's hyperparameters, under the spec's canonical names.

    ``rollback_max=None`` means "``DEFAULT_ROLLBACK_FRACTION / lr0``", resolved by
    :func:`resolve_rollback_max` once the base learning rate is known.

    Examples
    --------
    >>> hp = HyperParams(paradigm="finetune")
    >>> hp.direction, hp.beta1, hp.rollback_power
    ('adam', 0.9, 1.0)
    """

    direction: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    paradigm: str = "scratch"
    weight_decay: float = 1e-2
    rollback_max: float | None = None
    rollback_min: float = 0.0
    rollback_power: float = 1.0

    def replace(self, **changes: Any) -> "HyperParams":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _as_real(x: Any) -> float | None:
    """``x`` as a float when it is a real number (numpy scalars and 0-d arrays included), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if getattr(x, "ndim", None) == 0 and getattr(x, "dtype", None) is not None and hasattr(x, "__float__"):
        kind = getattr(x.dtype, "kind", "f")
        return float(x) if kind in "fiu" else None
    return None


def _is_real(x: Any) -> bool:
    return _as_real(x) is not None


def _check_range(name, value, lo, hi, *, lo_open=False, hi_open=False, accepted=None):
    raw, value = value, _as_real(value)
    ok = value is not None and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) if lo is not None else True
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if accepted is None:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            accepted = f"a finite number in {left}{lo}, {'inf' if hi is None else hi}{right}"
        raise invalid(name, raw, accepted)


def resolve_rollback_max(rollback_max: float | None, base_lr: float | None, *, names: Mapping[str, str] | None = None) -> float:
    """Return ``rollback_max``, or the default ``0.01 / base_lr`` when it is ``None``.

    Examples
    --------
    >>> resolve_rollback_max(None, 1e-3)
    10.0
    >>> resolve_rollback_max(3.0, 1e-3)
    3.0
    """
    if rollback_max is not None:
        return rollback_max
    n = dict(names or {})
    lr_name = n.get("lr", "lr")
    lr0 = _as_real(base_lr)
    if not (lr0 is not None and math.isfinite(lr0) and lr0 > 0):
        raise invalid(
            n.get("rollback_max", "rollback_max"),
            None,
            f"a finite float >= 0 (the default None means {DEFAULT_ROLLBACK_FRACTION}/{lr_name} "
            f"and needs a positive base {lr_name}, got {base_lr!r})",
        )
    return DEFAULT_ROLLBACK_FRACTION / lr0


def validate(hp: HyperParams, *, lr: float | None = None, nonfinite: str = "skip", names: Mapping[str, str] | None = None,
             also_accepted: Mapping[str, Sequence[str]] | None = None) -> None:
    """Check one group's hyperparameters; raise :class:`HyperparameterError` on the first bad one.

    Parameters
    ----------
    hp : HyperParams
        The group's hyperparameters (``rollback_max`` may still be ``None``).
    lr : float or None
        The base learning rate when it is a number; ``None`` when it is a
        schedule (the pull-coefficient bound is then enforced at run time by
        clipping, see the spec).
    nonfinite : str
        The non-finite gradient policy.
    names : mapping, optional
        Canonical name -> the adapter's public name (``{"beta1": "betas[0]"}``).
    also_accepted : mapping, optional
        Canonical name -> forms the adapter accepts besides the core's range
        (``{"lr": ("an optax schedule",)}``), appended by :func:`accepted` to
        every range message about that argument.

    Examples
    --------
    >>> validate(HyperParams(), lr=1e-3)
    >>> validate(HyperParams(beta1=1.0), lr=1e-3, names={"beta1": "b1"})
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: b1=1.0 is invalid: expected a finite number in [0, 1).
    """
    n = dict(names or {})
    also = dict(also_accepted or {})

    def nm(key: str) -> str:
        return n.get(key, key)

    def acc(key: str) -> str:
        return accepted(key, also.get(key, ()))

    if lr is not None:
        _check_range(nm("lr"), lr, 0.0, None, accepted=acc("lr"))
    if hp.direction not in DIRECTIONS:
        raise invalid(nm("direction"), hp.direction, acc("direction"))
    if hp.paradigm not in PARADIGMS:
        raise invalid(nm("paradigm"), hp.paradigm, acc("paradigm"))
    if nonfinite not in NONFINITE_POLICIES:
        raise invalid(nm("nonfinite"), nonfinite, acc("nonfinite"))
    _check_range(nm("beta1"), hp.beta1, 0, 1, hi_open=True, accepted=acc("beta1"))
    _check_range(nm("beta2"), hp.beta2, 0, 1, hi_open=True, accepted=acc("beta2"))
    _check_range(nm("eps"), hp.eps, 0.0, None, accepted=acc("eps"))
    _check_range(nm("momentum"), hp.momentum, 0, 1, hi_open=True, accepted=acc("momentum"))
    if not isinstance(hp.nesterov, bool):
        raise invalid(nm("nesterov"), hp.nesterov, acc("nesterov"))
    if hp.nesterov and hp.direction == "sgd" and hp.momentum <= 0:
        raise invalid(nm("momentum"), hp.momentum, "a momentum > 0 when nesterov=True")
    _check_range(nm("weight_decay"), hp.weight_decay, 0.0, None, accepted=acc("weight_decay"))
    if hp.rollback_max is not None:
        _check_range(nm("rollback_max"), hp.rollback_max, 0.0, None, accepted=acc("rollback_max"))
    _check_range(nm("rollback_min"), hp.rollback_min, 0.0, None, accepted=acc("rollback_min"))
    _check_range(nm("rollback_power"), hp.rollback_power, 0.0, None, lo_open=True, accepted=acc("rollback_power"))
    rollback_max = hp.rollback_max
    if rollback_max is None and hp.paradigm == "finetune":
        rollback_max = resolve_rollback_max(None, lr, names=n) if lr is not None else None
    if rollback_max is not None and hp.rollback_min > rollback_max:
        raise invalid(nm("rollback_min"), hp.rollback_min, f"a value <= {nm('rollback_max')}={rollback_max!r}")
    if lr is not None:
        # The pull interpolates between the pre-weight and the anchor, so its
        # coefficient lr * rho must lie in [0, 1]; rho peaks at weight_decay
        # (deepest scratch layer) and at rollback_max (shallowest finetune layer).
        if hp.paradigm == "scratch" and lr * hp.weight_decay > 1.0:
            raise invalid(
                nm("weight_decay"), hp.weight_decay,
                f"{nm('lr')} * {nm('weight_decay')} <= 1 (the pull coefficient must lie in [0, 1]; "
                f"{nm('lr')}={lr!r} gives {lr * hp.weight_decay!r})",
            )
        if hp.paradigm == "finetune" and rollback_max is not None and lr * rollback_max > 1.0:
            raise invalid(
                nm("rollback_max"), hp.rollback_max,
                f"{nm('lr')} * {nm('rollback_max')} <= 1 (the pull coefficient must lie in [0, 1]; "
                f"{nm('lr')}={lr!r} gives {lr * rollback_max!r})",
            )


_LOW_PRECISION = ("float16", "bfloat16")


def dtype_name(dtype: Any) -> str:
    """A framework-neutral dtype name: ``"float32"`` for numpy, jax, torch and Keras spellings.

    Examples
    --------
    >>> dtype_name("bfloat16"), dtype_name(float)
    ('bfloat16', 'float')
    >>> import numpy as np
    >>> dtype_name(np.dtype("float16")), dtype_name(np.float64)
    ('float16', 'float64')
    """
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    name = getattr(dtype, "__name__", None)
    if isinstance(name, str):
        return name
    return str(dtype).removeprefix("torch.")


def check_anchor(name: str, anchor_shape: Any, anchor_dtype: Any, param_shape: Any, param_dtype: Any) -> None:
    """Reject an explicit finetune anchor that does not fit its parameter (spec section 6), in the shared wording.

    The shape must equal the parameter's; the dtype must be the parameter's
    or its compute dtype (float32 for float16/bfloat16 parameters), so that
    converting it is lossless. Adapters pass the name the user would look
    for (``"anchor['encoder.0.weight']"``); dtypes may be any framework's.

    Examples
    --------
    >>> check_anchor("anchor['w']", (2,), "float32", (2,), "bfloat16")
    >>> check_anchor("anchor['w']", (3,), "float32", (2,), "float32")
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: anchor['w']='<array of shape (3,)>' is invalid: expected an array of the parameter's shape (2,).
    >>> check_anchor("anchor['w']", (2,), "float64", (2,), "float32")
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: anchor['w']='<array of dtype float64>' is invalid: expected dtype float32 (the parameter's dtype or its compute dtype; convert explicitly if a lossy cast is intended).
    """
    shape, expected = tuple(anchor_shape), tuple(param_shape)
    if shape != expected:
        raise invalid(name, f"<array of shape {shape}>", f"an array of the parameter's shape {expected}")
    given, own = dtype_name(anchor_dtype), dtype_name(param_dtype)
    compute = "float32" if own in _LOW_PRECISION else own
    if given not in (own, compute):
        accepted = own if compute == own else f"{own} or {compute}"
        raise invalid(name, f"<array of dtype {given}>",
                      f"dtype {accepted} (the parameter's dtype or its compute dtype; "
                      "convert explicitly if a lossy cast is intended)")


class WeightDecayWarning(UserWarning):
    """``weight_decay=0`` was given where it cannot change anything (a finetune tensor)."""


def warn_finetune_weight_decay(name: str = "weight_decay", where: str = "a finetune group", stacklevel: int = 3) -> None:
    """Warn that ``weight_decay=0`` does not turn off a finetune tensor's pull (spec section 2).

    ``weight_decay`` is lambda, the *scratch* paradigm's rate; a finetune
    tensor is pulled toward its anchor at a rate set by ``rollback_max``
    (``rollback_max=0`` or ``paradigm="none"`` turns the pull off). Setting it
    to 0 for finetune tensors is the Hugging Face no-decay habit carried over,
    and it silently changes nothing, so adapters warn with this one message.
    """
    import warnings

    warnings.warn(
        f"{name}=0 for {where} changes nothing: weight_decay is the scratch paradigm's rate, and finetune tensors "
        "are pulled toward their anchors at a rate set by rollback_max. To turn the pull off, use "
        "paradigm='none' for those tensors (for biases and norms: the no_pull option) or rollback_max=0.",
        WeightDecayWarning, stacklevel=stacklevel + 1)
