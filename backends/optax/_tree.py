"""Pytree plumbing for :mod:`dualopt.optax`: key paths, natural order, per-leaf settings.

JAX flattens dicts in sorted key order (``Dense_10`` before ``Dense_2``), so
nothing here takes depth from flatten order. A per-leaf setting is a single
value, a pytree whose structure is a prefix of the params', or a function of
the key path (a tuple of plain keys: dict keys and attribute names as they
are, sequence positions as ``int``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Hashable, Sequence

import jax

from decoupled_core import (LayerOrderWarning, canonical_order, check_layer_count, check_layer_key, invalid,
                            natural_sort_key)

__all__ = ["Path", "leaf_paths", "path_str", "natural_key", "natural_layer_index", "layer_keys", "per_leaf"]

Path = tuple[Hashable, ...]
"""A leaf's key path as plain keys: ``("params", "Dense_0", "kernel")`` or ``("layers", 3, "w")``."""


class _Box:
    """Holds a user value while it is broadcast over a subtree (so that ``None``,
    tuples or arrays inside a setting are never mistaken for pytree nodes)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _plain_key(entry: Any) -> Hashable:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def leaf_paths(tree: Any) -> list[Path]:
    """Key paths of ``tree``'s leaves in flatten order, as tuples of plain keys.

    Examples
    --------
    >>> import numpy as np
    >>> leaf_paths({"b": [np.zeros(1)], "a": {"kernel": np.zeros(1)}})
    [('a', 'kernel'), ('b', 0)]
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return [tuple(_plain_key(e) for e in path) for path, _ in with_path]


def _is_variable(x: Any) -> bool:
    # nnx.Optimizer calls init with nnx.Variable leaves and update with their plain arrays; a Variable's
    # own key ("value") must not become part of the path, or the anchors saved at init match nothing later.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def path_str(path: Path, sep: str = "/") -> str:
    """``("backbone", "Dense_0", "kernel")`` -> ``"backbone/Dense_0/kernel"``.

    Examples
    --------
    >>> path_str(("layers", 3, "w"))
    'layers/3/w'
    """
    return sep.join(str(k) for k in path)


def natural_key(path: Path) -> tuple:
    """Sort key of a key path in natural order: digit runs compare as integers, a prefix sorts first.

    Examples
    --------
    >>> sorted(["Dense_10", "Dense_2", "Dense_1"], key=lambda k: natural_key((k,)))
    ['Dense_1', 'Dense_2', 'Dense_10']
    """
    return tuple(natural_sort_key(k) for k in path)


def _module_of(path: Path, granularity: str | int) -> Path:
    if granularity == "leaf":
        return path
    return path[:-1] if granularity == "module" else path[:int(granularity)]


def natural_layer_index(params: Any, granularity: str | int = "module") -> Any:
    """Number the layers of ``params`` by the natural order of their key paths.

    Parameters
    ----------
    params : pytree
        The parameters (arrays or ``jax.ShapeDtypeStruct``; only the structure is read).
    granularity : {"module", "leaf"} or int
        What one layer is. ``"module"`` (default): the leaves that share a key
        path up to their last key (a Flax ``Dense_3``'s ``kernel`` and ``bias``)
        form one layer. ``"leaf"``: every leaf is its own layer. An ``int`` ``k``:
        leaves sharing their first ``k`` keys form one layer (``k=2`` makes
        ``("encoder", "layers_4", ...)`` one layer whatever lies below).

    Returns
    -------
    pytree of int
        Same structure as ``params``; layer ``0`` is the first group in natural
        order (``layers_2`` before ``layers_10``), numbers are contiguous.

    Examples
    --------
    >>> import numpy as np
    >>> params = {f"Dense_{i}": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)} for i in (0, 1, 2, 10)}
    >>> idx = natural_layer_index(params)
    >>> idx["Dense_2"], idx["Dense_10"]
    ({'bias': 2, 'kernel': 2}, {'bias': 3, 'kernel': 3})
    >>> natural_layer_index(params, "leaf")["Dense_10"]
    {'bias': 6, 'kernel': 7}
    """
    if not (granularity in ("module", "leaf") or (isinstance(granularity, int) and not isinstance(granularity, bool)
                                                  and granularity >= 1)):
        raise invalid("granularity", granularity, "'module', 'leaf' or a positive int (key-path prefix length)")
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, _natural_numbers(leaf_paths(params), granularity))


def _natural_numbers(paths: Sequence[Path], granularity: str | int) -> list[int]:
    modules = [_module_of(p, granularity) for p in paths]
    order = sorted(set(modules), key=natural_key)
    rank = {m: i for i, m in enumerate(order)}
    return [rank[m] for m in modules]


def per_leaf(name: str, value: Any, params: Any, paths: Sequence[Path]) -> list[Any]:
    """Resolve one setting to a list with one entry per leaf of ``params`` (flatten order).

    ``value`` is a single value, a prefix pytree of values, or a callable of
    the key path (see the module docstring). ``None`` inside a prefix pytree is
    a value, not an empty subtree.

    Examples
    --------
    >>> import numpy as np
    >>> params = {"backbone": {"w": np.zeros(2), "b": np.zeros(2)}, "head": np.zeros(2)}
    >>> paths = leaf_paths(params)
    >>> per_leaf("paradigm", {"backbone": "finetune", "head": "scratch"}, params, paths)
    ['finetune', 'finetune', 'scratch']
    >>> per_leaf("paradigm", lambda path: "scratch" if path[0] == "head" else "finetune", params, paths)
    ['finetune', 'finetune', 'scratch']
    """
    n = len(paths)
    if n == 0:  # nothing to resolve; also optax.tree_map_params's leafless stand-in for the params
        return []
    if callable(value) and not isinstance(value, jax.Array):
        return [value(p) for p in paths]
    is_none = lambda x: x is None  # noqa: E731
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value, is_leaf=is_none)):
        return [value] * n
    try:
        full = jax.tree_util.tree_map(
            lambda v, sub: jax.tree_util.tree_map(lambda _: _Box(v), sub), value, params, is_leaf=is_none)
    except (ValueError, TypeError, KeyError) as e:
        raise invalid(
            name, _short(value),
            "a single value, a function of the key path, or a pytree whose structure is a prefix of the "
            f"params' ({e})") from None
    return [b.value for b in jax.tree_util.tree_leaves(full)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def module_order_of(layer_index: Any) -> list[tuple[str, ...]] | None:
    """A ``layer_index`` given as module paths in definition order (``["Conv_0", "BatchNorm_0"]``, ``"a/b"``
    strings or tuples), as tuples of strings; else ``None``."""
    if not isinstance(layer_index, (list, tuple)) or not layer_index:
        return None
    if not all(isinstance(m, str) or (isinstance(m, tuple) and m and all(isinstance(c, (str, int)) for c in m))
               for m in layer_index):
        return None
    return [tuple(m.split("/")) if isinstance(m, str) else tuple(str(c) for c in m) for m in layer_index]


def canonical_keys(paths: Sequence[Path], paradigms: Sequence[str], module_order: Sequence[tuple[str, ...]] | None,
                   warn: bool) -> list[int]:
    """Each leaf's default layer key: :func:`decoupled_core.canonical_order` of its key path.

    With ``warn``, the sibling modules whose order the names do not give are
    reported in a :class:`decoupled_core.LayerOrderWarning`, per pulled
    paradigm (siblings in different paradigms never share a numbering).
    """
    text = [tuple(str(c) for c in p) if module_order is not None else p for p in paths]
    keys, _ = canonical_order(text, module_order)
    if warn and module_order is None:
        found: list[str] = []
        for paradigm in ("finetune", "scratch"):
            subset = [p for p, q in zip(paths, paradigms) if q == paradigm]
            if len(subset) > 1:
                found += [a for a in canonical_order(subset)[1] if a not in found]
        if found:
            warnings.warn(
                "dualopt: the default layer order (spec section 3: modules in definition order, weight before "
                "bias) is read from the key paths, and here they do not give it: " + "; ".join(found)
                + ". The layers were numbered by natural name order. Pass layer_index=[module paths in definition "
                "order] (e.g. ['Conv_0', 'BatchNorm_0', 'Conv_1']), or a pytree / function of layer keys; "
                "check the result with dualopt.optax.layer_rates.", LayerOrderWarning, stacklevel=5)
    return keys


def layer_keys(layer_index: Any, params: Any, paths: Sequence[Path], paradigms: Sequence[str],
               warn: bool = False) -> list[int]:
    """Each leaf's layer key from the ``layer_index`` argument of :func:`dualopt.optax.dualopt`.

    ``None`` or ``"leaf"``: the canonical order (:func:`canonical_keys`); a
    list of module paths: the same, modules in that order; ``"module"``: see
    :func:`natural_layer_index`; otherwise a per-leaf setting of non-negative
    ints, checked by the core. A flat list of keys for a flat list of arrays is
    the torch-like spelling: its length must be the number of leaves.
    """
    order = module_order_of(layer_index)
    if layer_index is None or order is not None or (isinstance(layer_index, str) and layer_index == "leaf"):
        return canonical_keys(paths, paradigms, order, warn)
    if isinstance(layer_index, str):
        if layer_index == "module":
            return _natural_numbers(paths, layer_index)
        raise invalid("layer_index", layer_index,
                      "None, 'leaf', 'module', a list of module paths, an int, a pytree of ints or a function of "
                      "the key path")
    is_leaf = jax.tree_util.treedef_is_leaf
    if (isinstance(layer_index, (list, tuple)) and isinstance(params, (list, tuple))
            and all(is_leaf(jax.tree_util.tree_structure(p)) for p in params)):
        check_layer_count("layer_index", len(layer_index), len(params))
        keys = list(layer_index)  # entry i is leaf i's key (a flat list's paths are (0,), (1,), ...)
    else:
        keys = per_leaf("layer_index", layer_index, params, paths)
    return [check_layer_key(f"layer_index[{path_str(path)!r}]", k) for path, k in zip(paths, keys)]
