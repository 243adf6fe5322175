"""Pytree plumbing for :mod:`dualopt.optax`: key paths, natural order, per-leaf settings.

JAX flattens dicts in *sorted key order*, so ``Dense_10`` comes before
``Dense_2``. DualOpt's layer schedules depend on depth, so nothing here uses
flatten order as depth: layer numbers come from the *natural* order of key
paths (digit runs compared as numbers, so ``layers_2 < layers_10``) or from
what the user passes.

A per-leaf setting (``paradigm``, ``weight_decay``, ``layer_index``...) may be

- a single value, used for every leaf;
- a pytree whose structure is a prefix of the params' (``{"backbone": "finetune",
  "head": "scratch"}`` covers every leaf under each key);
- a function of the key path, called once per leaf with the path as a tuple
  of plain keys (``("backbone", "Dense_0", "kernel")``: dict keys and
  attribute names as they are, sequence positions as ``int``).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Hashable, Sequence

import jax

from decoupled_core import invalid

__all__ = [
    "Path",
    "leaf_paths",
    "path_str",
    "natural_key",
    "natural_layer_index",
    "layer_keys",
    "per_leaf",
]

Path = tuple[Hashable, ...]
"""A leaf's key path as plain keys: ``("params", "Dense_0", "kernel")`` or ``("layers", 3, "w")``."""

_DIGITS = re.compile(r"(\d+)")


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
    """Sort key that orders key paths naturally: digit runs compare as integers.

    Each component is split into text and digit runs; digits compare by value
    (ties between ``"01"`` and ``"1"`` fall back to the text), text compares as
    text, and a shorter path that is a prefix of a longer one sorts first.

    Examples
    --------
    >>> sorted(["Dense_10", "Dense_2", "Dense_1"], key=lambda k: natural_key((k,)))
    ['Dense_1', 'Dense_2', 'Dense_10']
    """
    out = []
    for k in path:
        if isinstance(k, int) and not isinstance(k, bool):
            out.append(((0, k, str(k)),))
            continue
        tokens = []
        for i, part in enumerate(_DIGITS.split(str(k))):
            if i % 2:  # a digit run
                tokens.append((0, int(part), part))
            elif part:
                tokens.append((1, part))
        out.append(tuple(tokens))
    return tuple(out)


def _module_of(path: Path, granularity: str | int) -> Path:
    if granularity == "leaf":
        return path
    if granularity == "module":
        return path[:-1]
    return path[:granularity]


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
    out = [b.value for b in jax.tree_util.tree_leaves(full)]
    if len(out) != n:  # pragma: no cover - tree_map guarantees it; kept as a guard against silent damage
        raise invalid(name, _short(value), f"one value per parameter leaf ({n})")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def layer_keys(layer_index: Any, params: Any, paths: Sequence[Path]) -> list[int]:
    """Each leaf's layer key from the ``layer_index`` argument of :func:`dualopt.optax.dualopt`.

    ``None`` or ``"leaf"``: every leaf its own layer in natural key-path order;
    ``"module"``: see :func:`natural_layer_index`; otherwise a per-leaf setting
    of non-negative ints (single int, prefix pytree or function of the path).
    """
    if layer_index is None or (isinstance(layer_index, str) and layer_index in ("leaf", "module")):
        return _natural_numbers(paths, "leaf" if layer_index is None else layer_index)
    if isinstance(layer_index, str):
        raise invalid("layer_index", layer_index,
                      "None, 'leaf', 'module', an int, a pytree of ints or a function of the key path")
    keys = per_leaf("layer_index", layer_index, params, paths)
    out = []
    for path, k in zip(paths, keys):
        ok = hasattr(k, "__index__") and not isinstance(k, bool)
        if ok:
            try:
                k = int(k.__index__())
            except Exception:  # a traced array cannot be a layer key
                ok = False
        if not ok or k < 0:
            raise invalid("layer_index", k, f"a non-negative integer layer key for every leaf (at {path_str(path)!r})")
        out.append(k)
    return out
