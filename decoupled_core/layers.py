"""Layer numbering and the per-layer pull rate rho_l (spec section "Layer schedules").

A *layer* is a group of parameter tensors that share one pull rate. Layers are
numbered separately in each paradigm: ``l`` is a layer's rank among the
distinct layers of its paradigm and ``L`` is how many there are.
"""

from __future__ import annotations

from typing import Any, Sequence

from .hyperparams import PARADIGMS, HyperParams, invalid

__all__ = ["check_layer_key", "check_layer_count", "number_layers", "scratch_rate", "finetune_rate", "pull_rate", "layer_rates"]


def check_layer_key(name: str, key: Any) -> int:
    """One layer key as an ``int``, or the shared error (adapters call it on keys they resolve themselves).

    Any non-negative integer is a key, including numpy and 0-d integer array
    scalars (``__index__``); bools, floats, strings and traced values are not.

    Examples
    --------
    >>> check_layer_key("layer_index", 3)
    3
    >>> check_layer_key("layer_index['head']", -1)
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: layer_index['head']=-1 is invalid: expected a non-negative integer layer key for every tensor.
    """
    value = None
    if not isinstance(key, bool) and hasattr(key, "__index__"):
        try:
            value = int(key.__index__())
        except Exception:  # e.g. a traced jax array, which cannot be a layer key
            value = None
    if value is None or value < 0:
        raise invalid(name, key, "a non-negative integer layer key for every tensor")
    return value


def check_layer_count(name: str, given: int, expected: int) -> None:
    """The shared error for a per-tensor ``layer_index`` sequence of the wrong length.

    Examples
    --------
    >>> check_layer_count("layer_index", 3, 2)
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: layer_index='<3 entries>' is invalid: expected one layer index per parameter tensor (2).
    """
    if given != expected:
        raise invalid(name, f"<{given} entries>", f"one layer index per parameter tensor ({expected})")


def number_layers(paradigms: Sequence[str], layer_index: Sequence[int] | None = None, *, name: str = "layer_index") -> list[tuple[int, int]]:
    """Return ``(l, L)`` for every tensor.

    Parameters
    ----------
    paradigms : sequence of str
        Each tensor's paradigm, in the order the framework presents the tensors.
    layer_index : sequence of int, optional
        Each tensor's layer key. Keys are non-negative integers; within one
        paradigm the distinct keys are sorted and ``l`` is a key's rank, so keys
        need not be contiguous and several tensors may share a layer. ``None``
        makes every tensor its own layer in presentation order.

    Examples
    --------
    >>> number_layers(["finetune", "finetune", "scratch"])
    [(0, 2), (1, 2), (0, 1)]
    >>> number_layers(["finetune"] * 3, [4, 4, 7])
    [(0, 2), (0, 2), (1, 2)]
    """
    for i, p in enumerate(paradigms):
        if p not in PARADIGMS:
            raise invalid("paradigm", p, f"one of {PARADIGMS}")
    if layer_index is None:
        keys = list(range(len(paradigms)))
    else:
        keys = list(layer_index)
        check_layer_count(name, len(keys), len(paradigms))
        keys = [check_layer_key(name, k) for k in keys]
    rank: dict[str, dict[int, int]] = {}
    for p in PARADIGMS:
        distinct = sorted({k for k, q in zip(keys, paradigms) if q == p})
        rank[p] = {k: r for r, k in enumerate(distinct)}
    return [(rank[p][k], len(rank[p])) for k, p in zip(keys, paradigms)]


def scratch_rate(l: int, L: int, weight_decay: Any) -> Any:
    """Real-time layer-wise decay rate: ``weight_decay * ((l + 1) / L)``; deeper decays more.

    Examples
    --------
    >>> [scratch_rate(l, 4, 0.1) for l in range(4)]
    [0.025, 0.05, 0.07500000000000001, 0.1]
    """
    return weight_decay * ((l + 1) / L)


def finetune_rate(l: int, L: int, rollback_max: Any, rollback_min: Any, rollback_power: Any) -> Any:
    """Rollback rate ``k_min + (1 - l/(L-1))**p * (k_max - k_min)``; ``k_max`` when ``L == 1``.

    Examples
    --------
    >>> [finetune_rate(l, 3, 10.0, 0.0, 1.0) for l in range(3)]
    [10.0, 5.0, 0.0]
    >>> finetune_rate(0, 1, 10.0, 2.0, 2.0)
    10.0
    """
    if L == 1:
        return rollback_max
    return rollback_min + (1.0 - l / (L - 1)) ** rollback_power * (rollback_max - rollback_min)


def pull_rate(paradigm: str, l: int, L: int, hp: HyperParams) -> Any:
    """rho_l for one tensor of ``paradigm`` (0 for ``"none"``); ``hp.rollback_max`` must be resolved.

    Examples
    --------
    >>> pull_rate("none", 0, 1, HyperParams())
    0.0
    """
    if paradigm == "scratch":
        return scratch_rate(l, L, hp.weight_decay)
    if paradigm == "finetune":
        if hp.rollback_max is None:
            raise ValueError("rollback_max must be resolved (resolve_rollback_max) before computing rates")
        return finetune_rate(l, L, hp.rollback_max, hp.rollback_min, hp.rollback_power)
    return 0.0


def layer_rates(hps: Sequence[HyperParams], layer_index: Sequence[int] | None = None) -> list[Any]:
    """rho for every tensor, given each tensor's group hyperparameters.

    Examples
    --------
    >>> ft = HyperParams(paradigm="finetune", rollback_max=4.0)
    >>> layer_rates([ft, ft, ft, HyperParams(weight_decay=0.5)])
    [4.0, 2.0, 0.0, 0.5]
    """
    layout = number_layers([hp.paradigm for hp in hps], layer_index)
    return [pull_rate(hp.paradigm, l, L, hp) for hp, (l, L) in zip(hps, layout)]
