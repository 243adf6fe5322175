"""Resolve :func:`dualopt.optax.dualopt`'s arguments to one configuration per parameter leaf.

Everything here runs in Python at trace time (once per compilation under
``jax.jit``): it reads only the params' tree *structure*, never their values,
so it works on abstract inputs (``jax.ShapeDtypeStruct``) too.

Hyperparameters may be traced 0-d arrays when the transform is built inside
``optax.inject_hyperparams``. Such values are carried as they are (the core's
formulas run on traced arrays) and are validated only when they are concrete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax

from decoupled_core import (HyperParams, accepted, invalid, number_layers, pull_rate, resolve_rollback_max, validate,
                            warn_finetune_weight_decay)

from ._tree import Path, layer_keys, leaf_paths, path_str, per_leaf

__all__ = ["PUBLIC_NAMES", "ALSO_ACCEPTED", "HP_ARGS", "Settings", "LeafConfig", "resolve_leaves", "check_settings",
           "resolve_anchors", "concrete_float", "base_lr_of", "is_schedule", "hashable"]

#: dualopt.optax argument -> canonical HyperParams field (the rest share their name).
HP_ARGS: dict[str, str] = {
    "direction": "direction", "b1": "beta1", "b2": "beta2", "eps": "eps", "momentum": "momentum",
    "nesterov": "nesterov", "paradigm": "paradigm", "weight_decay": "weight_decay",
    "rollback_max": "rollback_max", "rollback_min": "rollback_min", "rollback_power": "rollback_power",
}
#: canonical name -> public name, for the shared validator's messages.
PUBLIC_NAMES: dict[str, str] = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2"}
#: Forms accepted besides the core's range (the core appends them to its message: ``decoupled_core.accepted``).
ALSO_ACCEPTED: dict[str, tuple[str, ...]] = {"lr": ("an optax schedule",)}

# Values that pass every check, substituted for traced hyperparameters so that
# the concrete ones can still be validated (a traced value cannot be checked).
_PLACEHOLDER = {"beta1": 0.0, "beta2": 0.0, "eps": 0.0, "momentum": 0.5, "weight_decay": 0.0,
                "rollback_max": None, "rollback_min": 0.0, "rollback_power": 1.0}


def concrete_float(x: Any) -> float | None:
    """``x`` as a Python float when it is known now (number or concrete 0-d array), else ``None``."""
    if isinstance(x, (bool, jax.core.Tracer)):
        return None
    try:
        return float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def base_lr_of(learning_rate: Any) -> float | None:
    """eta_0: the number itself, ``schedule(0)`` for a schedule, ``None`` when it is traced."""
    if callable(learning_rate) and not isinstance(learning_rate, jax.Array):
        try:
            with jax.ensure_compile_time_eval():
                return concrete_float(learning_rate(0))
        except Exception:  # a schedule that cannot run at step 0 outside a trace
            return None
    return concrete_float(learning_rate)


@dataclass(frozen=True)
class Settings:
    """The transform's arguments, as the user gave them (values, pytrees or functions)."""

    learning_rate: Any
    hyper: dict[str, Any]  # public name -> setting, for every key of HP_ARGS
    layer_index: Any
    anchor: Any
    nonfinite: str
    base_learning_rate: Any = None  # eta_0 of a schedule (spec section 2); None: the number or schedule(0)


@dataclass(frozen=True)
class LeafConfig:
    """What one parameter leaf needs at update time."""

    hp: HyperParams  # rollback_max resolved for finetune leaves; fields may be traced
    rate: Any  # rho_l: a host float, or a traced 0-d array under inject_hyperparams
    path: Path


def hashable(v: Any) -> Any:
    """``v`` itself where it is hashable, else a key by identity (a traced array)."""
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


def _validate_once(hp: HyperParams, lr: float | None, nonfinite: str, seen: set) -> None:
    key = tuple(hashable(v) for v in hp.as_dict().values())
    if key in seen:
        return
    seen.add(key)
    # Only a traced value (inject_hyperparams) is replaced: anything else, bools and
    # strings included, goes to the core as the user gave it, so it is rejected in its words.
    concrete = {name: _PLACEHOLDER[name] if isinstance(v, jax.core.Tracer) and name in _PLACEHOLDER else v
                for name, v in hp.as_dict().items()}
    validate(hp.replace(**concrete), lr=lr, nonfinite=nonfinite, names=PUBLIC_NAMES, also_accepted=ALSO_ACCEPTED)


def eta_0(settings: Settings) -> float | None:
    """eta_0 of spec section 2: ``base_learning_rate`` when given, else the number or ``schedule(0)``."""
    if settings.base_learning_rate is not None:
        return float(settings.base_learning_rate)
    return base_lr_of(settings.learning_rate)


def _resolve_rollback(hp: HyperParams, learning_rate: Any, base_lr: float | None,
                      explicit_base: Any = None) -> HyperParams:
    if hp.paradigm != "finetune" or hp.rollback_max is not None:
        return hp
    if is_schedule(learning_rate) and explicit_base is None and base_lr == 0.0:
        raise invalid(
            "rollback_max", None,
            "an explicit value, or base_learning_rate=<the schedule's peak learning rate>: the default "
            "rollback_max is 0.01/eta_0, eta_0 is the schedule's base (peak) rate, and a plain schedule "
            "that starts at 0 (warmup) does not say what it is")
    if not (isinstance(learning_rate, (int, float)) or callable(learning_rate)) or base_lr is None:
        raise invalid(
            "rollback_max", None,
            "an explicit value when learning_rate is an array (as under optax.inject_hyperparams): the default "
            "0.01/learning_rate needs the base learning rate when the transform is built")
    return hp.replace(rollback_max=resolve_rollback_max(None, base_lr, names=PUBLIC_NAMES))


def resolve_leaves(settings: Settings, params: Any, warn: bool = False) -> tuple[list[LeafConfig], list[Path]]:
    """One :class:`LeafConfig` per leaf of ``params`` (flatten order), validated where concrete.

    ``warn``: report an ambiguous default layer order (done by ``init`` and ``layer_rates``, not every update).
    """
    paths = leaf_paths(params)
    columns = {HP_ARGS[k]: per_leaf(k, v, params, paths) for k, v in settings.hyper.items()}
    # A schedule's rate is bounded at run time (clipping, spec section 4.2), not checked against eta_0.
    lr_for_checks = None if is_schedule(settings.learning_rate) else base_lr_of(settings.learning_rate)
    base_lr = eta_0(settings)
    seen: set = set()
    hps = []
    for i, path in enumerate(paths):
        hp = HyperParams(**{name: col[i] for name, col in columns.items()})
        try:
            _validate_once(hp, lr_for_checks, settings.nonfinite, seen)
            hp = _resolve_rollback(hp, settings.learning_rate, base_lr, settings.base_learning_rate)
        except ValueError as e:
            if len(paths) > 1 and any(not _is_single(v) for v in settings.hyper.values()):
                raise type(e)(f"{e} (parameter {path_str(path)!r})") from None
            raise
        hps.append(hp)
    if warn:
        _warn_zero_decay(hps, _is_single(settings.hyper["weight_decay"]))
    keys = layer_keys(settings.layer_index, params, paths, [hp.paradigm for hp in hps], warn)
    layout = number_layers([hp.paradigm for hp in hps], keys)
    leaves = [LeafConfig(hp, pull_rate(hp.paradigm, l, L, hp), path) for hp, (l, L), path in zip(hps, layout, paths)]
    return leaves, paths


def _warn_zero_decay(hps: Sequence[HyperParams], single: bool) -> None:
    """The shared warning when weight_decay=0 reaches finetune leaves in the belief that it turns their pull off.

    A per-leaf setting of 0 on a finetune leaf always warns; a single 0 only
    when no leaf is scratch (else it is the scratch leaves' lambda).
    """
    zero = [hp for hp in hps if hp.paradigm == "finetune" and concrete_float(hp.weight_decay) == 0.0]
    if zero and (not single or not any(hp.paradigm == "scratch" for hp in hps)):
        warn_finetune_weight_decay(where="finetune leaves", stacklevel=4)


def _is_single(v: Any) -> bool:
    if callable(v) and not isinstance(v, jax.Array):
        return False
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(v, is_leaf=lambda x: x is None))


def check_settings(settings: Settings) -> None:
    """Construction-time checks of everything that does not need the params."""
    lr = settings.learning_rate
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) or callable(lr) or hasattr(lr, "dtype")):
        raise invalid("learning_rate", lr, accepted("lr", ALSO_ACCEPTED["lr"]))
    base = base_lr_of(lr)
    if base is not None and not (math.isfinite(base) and base >= 0):
        raise invalid("learning_rate", lr if not callable(lr) else f"<schedule with schedule(0)={base!r}>",
                      accepted("lr", ALSO_ACCEPTED["lr"]) if not callable(lr)
                      else "a schedule with a finite schedule(0) >= 0")
    b0 = settings.base_learning_rate
    if b0 is not None:
        value = concrete_float(b0)
        if value is None or not (math.isfinite(value) and value > 0):
            raise invalid("base_learning_rate", b0, "None or a finite float > 0 (eta_0: a schedule's peak rate)")
    single = {HP_ARGS[k]: v for k, v in settings.hyper.items() if _is_single(v)}
    if len(single) == len(HP_ARGS):
        hp = HyperParams(**single)
        _validate_once(hp, None if is_schedule(lr) else base, settings.nonfinite, set())
        if hp.paradigm == "finetune":
            _resolve_rollback(hp, lr, eta_0(settings), b0)
    elif settings.nonfinite not in ("skip", "propagate"):
        validate(HyperParams(), nonfinite=settings.nonfinite, names=PUBLIC_NAMES, also_accepted=ALSO_ACCEPTED)


def is_schedule(learning_rate: Any) -> bool:
    return callable(learning_rate) and not isinstance(learning_rate, jax.Array)


def resolve_anchors(anchor: Any, params: Any, paths: Sequence[Path]) -> list[Any]:
    """The user's ``anchor`` argument as one entry (array or None) per leaf."""
    if anchor is None:
        return [None] * len(paths)
    return per_leaf("anchor", anchor, params, paths)

