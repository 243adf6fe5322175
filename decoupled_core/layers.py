"""Layer numbering and the per-layer pull rate rho_l (spec section "Layer schedules").

A *layer* is a group of parameter tensors that share one pull rate. Layers are
numbered separately in each paradigm: ``l`` is a layer's rank among the
distinct layers of its paradigm and ``L`` is how many there are.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .hyperparams import PARADIGMS, HyperParams, invalid

__all__ = ["check_layer_key", "check_layer_count", "number_layers", "scratch_rate", "finetune_rate", "pull_rate", "layer_rates",
           "canonical_order", "role_rank", "natural_sort_key", "LayerOrderWarning", "FIRST_ROLES", "LAST_ROLES"]


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


#: Leaf names of the tensor that comes first in a module (spec section 3, "Default layer keys"):
#: the weight / kernel / embedding, or a norm's scale.
FIRST_ROLES = frozenset({"weight", "kernel", "embedding", "embeddings", "w", "scale", "gamma"})
#: Leaf names of the tensor that comes last in a module: the bias, or a norm's offset.
LAST_ROLES = frozenset({"bias", "b", "offset", "beta"})

_DIGIT_RUN = re.compile(r"(\d+)")
_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


class LayerOrderWarning(UserWarning):
    """The default layer order rests on names that do not say which module comes first."""


def role_rank(name: Any) -> int:
    """Rank of a leaf name within its module: 0 weight/kernel/scale, 1 anything else, 2 bias/offset.

    Examples
    --------
    >>> [role_rank(n) for n in ("bias", "kernel", "recurrent_kernel", "gamma", "beta")]
    [2, 0, 1, 0, 2]
    """
    text = str(name).lower()
    if text in FIRST_ROLES:
        return 0
    if text in LAST_ROLES:
        return 2
    return 1


def natural_sort_key(component: Any) -> tuple:
    """Sort key of one path component: digit runs compare as integers (``Dense_2 < Dense_10``).

    Examples
    --------
    >>> sorted(["Dense_10", "Dense_2", "Dense_1"], key=natural_sort_key)
    ['Dense_1', 'Dense_2', 'Dense_10']
    """
    if isinstance(component, int) and not isinstance(component, bool):
        return ((0, component, str(component)),)
    tokens: list[tuple] = []
    for i, part in enumerate(_DIGIT_RUN.split(str(component))):
        if i % 2:
            tokens.append((0, int(part), part))
        elif part:
            tokens.append((1, part))
    return tuple(tokens)


def _module_number(component: Any) -> int | None:
    """The definition index a module's name carries (``layers_3`` -> 3, ``Dense_0`` -> 0, ``4`` -> 4)."""
    if isinstance(component, int) and not isinstance(component, bool):
        return component
    m = _NUMBERED.match(str(component))
    return int(m.group(2)) if m else None


def canonical_order(paths: Sequence[tuple], module_order: Sequence[tuple] | None = None
                    ) -> tuple[list[int], list[str]]:
    """The canonical default layer key of every tensor, from key paths alone (spec section 3).

    Modules come in definition order, and within a module the weight / kernel /
    embedding / scale comes before other tensors, which come before the bias /
    offset. A tree of named arrays does not record definition order; it is read
    from the names: sibling modules are ordered by the number their name
    carries (``layers_2`` before ``layers_10``; a list position is its number).
    That is the definition order only when the siblings share one name and
    differ in their numbers, so any other set of siblings (``encoder`` next to ``head``, or
    Flax's per-type counters ``Conv_0`` next to ``BatchNorm_0``) is ordered
    naturally by name and reported as ambiguous, as are two tensors of one
    module whose roles are unknown.

    Parameters
    ----------
    paths : sequence of tuple
        Each tensor's key path; the last entry is the tensor's name, the
        entries before it name the module.
    module_order : sequence of tuple, optional
        Module paths (key-path prefixes) in definition order, given by the
        user; each tensor takes the position of the longest prefix of its
        path in this list, and the names are not read. Every tensor must
        fall under one of them.

    Returns
    -------
    keys : list of int
        ``keys[i]`` is tensor ``i``'s rank in the canonical order (a permutation of ``range(len(paths))``).
    ambiguities : list of str
        Human-readable descriptions of the sibling sets whose order was a guess; empty when none.

    Examples
    --------
    >>> paths = [("Dense_0", "bias"), ("Dense_0", "kernel"), ("Dense_1", "bias"), ("Dense_1", "kernel")]
    >>> canonical_order(paths)
    ([1, 0, 3, 2], [])
    >>> canonical_order([("head", "w"), ("encoder", "w")])[1]
    ["modules 'encoder', 'head' under the root carry no distinct definition numbers"]
    >>> canonical_order([("head", "w"), ("encoder", "w")], module_order=[("encoder",), ("head",)])
    ([1, 0], [])
    """
    paths = [tuple(p) for p in paths]
    ambiguities: list[str] = []
    if module_order is not None:
        order = [tuple(m) if isinstance(m, (tuple, list)) else (m,) for m in module_order]
        position = {m: i for i, m in enumerate(order)}
        if len(position) != len(order):
            raise invalid("layer_index", "<module order with a repeated module>", "distinct module paths")

        def module_rank(path: tuple) -> int:
            for k in range(len(path), 0, -1):
                if path[:k] in position:
                    return position[path[:k]]
            raise invalid("layer_index", "<module order>",
                          f"a list of module paths that covers every tensor (none is a prefix of {path!r})")

        sort_keys = [(module_rank(p), role_rank(p[-1]) if p else 1, natural_sort_key(p[-1]) if p else ())
                     for p in paths]
    else:
        _collect_ambiguities(paths, ambiguities)
        sort_keys = [_default_key(p) for p in paths]
    order_idx = sorted(range(len(paths)), key=lambda i: (sort_keys[i], i))
    keys = [0] * len(paths)
    for rank, i in enumerate(order_idx):
        keys[i] = rank
    return keys, ambiguities


def _default_key(path: tuple) -> tuple:
    modules = tuple((_module_number(c) if _module_number(c) is not None else -1, natural_sort_key(c))
                    for c in path[:-1])
    leaf = path[-1] if path else ""
    return (modules, role_rank(leaf), natural_sort_key(leaf))


def _collect_ambiguities(paths: Sequence[tuple], out: list[str]) -> None:
    children: dict[tuple, set] = {}
    leaves: dict[tuple, list] = {}
    for p in paths:
        for depth in range(len(p) - 1):
            children.setdefault(p[:depth], set()).add(p[depth])
        if p:
            leaves.setdefault(p[:-1], []).append(p[-1])
    for parent, kids in children.items():
        if len(kids) < 2:
            continue
        numbers = [_module_number(k) for k in kids]
        matches = [None if isinstance(k, int) else _NUMBERED.match(str(k)) for k in kids]
        prefixes = {m.group(1) if m else "" for m in matches}
        if None in numbers or len(set(numbers)) != len(numbers) or len(prefixes) > 1:
            where = "/".join(str(c) for c in parent) or "the root"
            names = ", ".join(repr(str(k)) for k in sorted(kids, key=natural_sort_key))
            out.append(f"modules {names} under {where} carry no distinct definition numbers")
    for parent, tensors in leaves.items():
        # List positions are an order of their own; only names without a known role are a guess.
        unknown = [n for n in tensors if role_rank(n) == 1 and not (isinstance(n, int) and not isinstance(n, bool))]
        if len(unknown) > 1:
            where = "/".join(str(c) for c in parent) or "the root"
            listed = ", ".join(repr(str(n)) for n in sorted(unknown, key=natural_sort_key))
            out.append(f"tensors {listed} of module {where} have no known role (weight, scale, bias, offset)")
