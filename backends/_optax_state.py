"""Checks that a state passed to :func:`dualopt.optax.dualopt`'s ``update`` belongs to these params.

A state restored from a checkpoint (``flax.serialization.from_state_dict``,
orbax, a hand-written ``.npz`` reader) is matched to its template by keys, not
by shapes, so a state saved for another model, with other paradigms or
directions, or by another transform would otherwise surface as an obscure
broadcasting error deep inside the update, or not at all (a float32 state
silently promoted by float64 params). Spec section 6 asks for a message
naming the offending parameter. Everything here reads only static shapes,
dtypes and tree structures, so it runs once per trace and costs nothing under
``jax.jit``.

Where the anchors live. A finetune leaf of more than :data:`PACK_MAX_SIZE`
elements keeps its anchor in ``state.anchor``, an array of its own (sharded
like its param where the params are sharded). The anchors of smaller finetune
leaves are packed, in flatten order, into one 1-D array per compute dtype,
``state.packed_anchor["float32"]``: on a model of many small tensors every
array passed through ``jax.jit`` costs more than its bytes (an input and an
output buffer per step, and a Python object), and one more array per small leaf
made a finetune step about 1.4x a scratch step on 2000 tensors of 32x32
(``benchmarks/README.md``). The layout is a function of the params' structure,
shapes and paradigms alone, so ``jax.eval_shape(tx.init, params)`` describes it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax

from decoupled_core import compute_dtype, dtype_name, invalid

from ._optax_config import LeafConfig
from ._optax_tree import leaf_paths, path_str

__all__ = ["STATE_FIELDS", "PACK_MAX_SIZE", "PackedSlot", "Anchors", "packed_layout", "pack", "check_state",
           "anchor_tree", "anchors_by_path"]

#: ``DualOptState``'s fields, in order (the state's format; see ``dualopt.optax.DualOptState``).
STATE_FIELDS = ("count", "skipped", "mu", "nu", "anchor", "packed_anchor")

#: Finetune leaves of at most this many elements keep their anchors in ``state.packed_anchor``.
#: Part of the state's format: a state saved with another value does not fit.
PACK_MAX_SIZE = 65536


class PackedSlot(NamedTuple):
    """Where a packed anchor lives: ``state.packed_anchor[key][offset:offset + size]``, reshaped."""

    key: str
    offset: int
    size: int
    shape: tuple[int, ...]


def packed_layout(configs: Sequence[LeafConfig],
                  leaves: Sequence[Any]) -> tuple[list[PackedSlot | None], dict[str, int]]:
    """Per leaf (flatten order) its :class:`PackedSlot` or None, and the length of each packed array.

    Examples
    --------
    >>> import numpy as np
    >>> from decoupled_core import HyperParams
    >>> cfg = lambda paradigm: LeafConfig(HyperParams(paradigm=paradigm), 0.0, ("w",))
    >>> slots, sizes = packed_layout([cfg("finetune"), cfg("scratch"), cfg("finetune")],
    ...                              [np.zeros((2, 3), np.float32), np.zeros(4, np.float32), np.zeros(5, np.float32)])
    >>> slots[2], sizes
    (PackedSlot(key='float32', offset=6, size=5, shape=(5,)), {'float32': 11})
    """
    slots: list[PackedSlot | None] = []
    sizes: dict[str, int] = {}
    for cfg, p in zip(configs, leaves):
        size = math.prod(p.shape)
        if cfg.hp.paradigm != "finetune" or size > PACK_MAX_SIZE:
            slots.append(None)
            continue
        key = dtype_name(compute_dtype(p.dtype, jax.numpy))
        slots.append(PackedSlot(key, sizes.get(key, 0), size, tuple(p.shape)))
        sizes[key] = sizes.get(key, 0) + size
    return slots, sizes


class Anchors(NamedTuple):
    """The anchors of a state, per leaf in flatten order: an own array, a packed slot, or neither."""

    own: list[Any]  # the leaf's array in state.anchor, or None
    slots: list[PackedSlot | None]
    packed: dict[str, Any]  # state.packed_anchor

    def of(self, i: int) -> Any:
        """Leaf ``i``'s anchor as an array of its param's shape (a slice of a packed array), or None."""
        slot = self.slots[i]
        if slot is None:
            return self.own[i]
        flat = jax.lax.slice(self.packed[slot.key], (slot.offset,), (slot.offset + slot.size,))
        return flat.reshape(slot.shape)


def pack(anchors: Sequence[Any]) -> Any:
    """The 1-D packed array of ``anchors`` (flatten order), replicated wherever the params are sharded.

    Pieces of differently sharded params cannot be concatenated as they are
    under JAX's explicit sharding, and a packed array sharded like its first
    piece would be meaningless; the packed anchors are small by construction.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    flat = []
    for a in anchors:
        a = jax.numpy.ravel(a)
        sharding = getattr(jax.typeof(a), "sharding", None)
        if isinstance(sharding, NamedSharding) and any(axis is not None for axis in sharding.spec):
            a = jax.sharding.reshard(a, NamedSharding(sharding.mesh, PartitionSpec()))
        flat.append(a)
    packed = jax.numpy.concatenate(flat)
    sharding = getattr(packed, "sharding", None) if not isinstance(packed, jax.core.Tracer) else None
    if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
        packed = jax.device_put(packed, NamedSharding(sharding.mesh, PartitionSpec()))
    return packed


def _describe(x: Any) -> str:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return f"<{type(x).__name__}>"
    return f"<array of shape {tuple(x.shape)} and dtype {dtype_name(x.dtype)}>"


def check_state(state: Any, params: Any, configs: Sequence[LeafConfig]) -> Anchors:
    """Raise the spec's ``"<name>=<value> is invalid: expected <accepted>."`` for a state that does not fit.

    Returns the state's :class:`Anchors` (own arrays matched by path, packed
    slots), so the update does not match them again.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from dualopt.optax import dualopt
    >>> params = {"w": jnp.ones(3)}
    >>> tx = dualopt(0.1)
    >>> tx.update(params, optax.adam(0.1).init(params), params)
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: state='<tuple>' is invalid: expected a DualOptState with fields ('count', 'skipped', 'mu', 'nu', 'anchor', 'packed_anchor') from this transform's init (the state of another optax transform cannot be used).
    """
    if getattr(state, "_fields", None) != STATE_FIELDS:
        raise invalid("state", f"<{type(state).__name__}>",
                      f"a DualOptState with fields {STATE_FIELDS} from this transform's init "
                      "(the state of another optax transform cannot be used)")
    for name in ("count", "skipped"):
        x = getattr(state, name)
        if getattr(x, "shape", None) != () or "int" not in dtype_name(getattr(x, "dtype", "")):
            raise invalid(f"state.{name}", x if not hasattr(x, "shape") else _describe(x), "a 0-d integer array")
    treedef = jax.tree_util.tree_structure(params)
    paths = [c.path for c in configs]
    for name in ("mu", "nu"):
        tree = getattr(state, name)
        if jax.tree_util.tree_structure(tree) != treedef:
            theirs = [path_str(p) for p in leaf_paths(tree)]
            ours = [path_str(p) for p in paths]
            missing = [p for p in ours if p not in theirs]
            extra = [p for p in theirs if p not in ours]
            what = (f"without the param {missing[0]!r}" if missing else
                    f"with the leaf {extra[0]!r} that the params do not have" if extra else
                    "of another tree structure")
            raise invalid(f"state.{name}", f"<pytree {what}>",
                          f"the params' structure {treedef} (was the state saved for another model?)")
    leaves = treedef.flatten_up_to(params)
    for name in ("mu", "nu"):
        for cfg, p, x in zip(configs, leaves, treedef.flatten_up_to(getattr(state, name))):
            hp = cfg.hp
            if name == "mu" or hp.direction == "adam":
                want, why = tuple(p.shape), ""
            else:
                want, why = (0,), " (an empty placeholder: direction='sgd' has no second moment)"
            _check_leaf(f"state.{name}[{path_str(cfg.path)!r}]", x, p, want, why, hp)
    slots, sizes = packed_layout(configs, leaves)
    packed = _check_packed(state.packed_anchor, sizes)
    finetune = {path_str(c.path): (c, p) for c, p, slot in zip(configs, leaves, slots)
                if c.hp.paradigm == "finetune" and slot is None}
    if not isinstance(state.anchor, dict):
        raise invalid("state.anchor", f"<{type(state.anchor).__name__}>",
                      "a dict of the finetune anchors (a DualOptState from this version's init)")
    by_path = anchors_by_path(state.anchor)
    if set(by_path) != set(finetune):
        missing, extra = sorted(set(finetune) - set(by_path)), sorted(set(by_path) - set(finetune))
        what = (f"<pytree without the finetune param {missing[0]!r}>" if missing else
                f"<pytree with the leaf {extra[0]!r}, not a finetune param of these params>")
        raise invalid("state.anchor", what,
                      f"one anchor per finetune leaf of more than {PACK_MAX_SIZE} elements ({len(finetune)}), keyed "
                      "by its path (was the state saved for another model or with other paradigms?)")
    for key, (cfg, p) in finetune.items():
        _check_leaf(f"state.anchor[{key!r}]", by_path[key], p, tuple(p.shape), "", cfg.hp)
    own = [by_path.get(path_str(c.path)) if slot is None and c.hp.paradigm == "finetune" else None
           for c, slot in zip(configs, slots)]
    return Anchors(own, slots, packed)


def _check_packed(packed: Any, sizes: dict[str, int]) -> dict[str, Any]:
    expected = ", ".join(f"{k!r}: {n} elements" for k, n in sorted(sizes.items())) or "nothing"
    accepted = (f"a dict of 1-D arrays keyed by dtype ({expected}): the anchors of the finetune leaves of at most "
                f"{PACK_MAX_SIZE} elements, packed in flatten order (was the state saved for another model, with "
                "other paradigms, or by another version?)")
    if not isinstance(packed, dict):
        raise invalid("state.packed_anchor", f"<{type(packed).__name__}>", accepted)
    if set(packed) != set(sizes):
        extra, missing = sorted(set(packed) - set(sizes)), sorted(set(sizes) - set(packed))
        what = f"<dict with the key {extra[0]!r}>" if extra else f"<dict without the key {missing[0]!r}>"
        raise invalid("state.packed_anchor", what, accepted)
    for key, n in sizes.items():
        x = packed[key]
        if tuple(getattr(x, "shape", (None,))) != (n,) or dtype_name(getattr(x, "dtype", "")) != key:
            raise invalid(f"state.packed_anchor[{key!r}]", _describe(x), accepted)
    return packed


def _check_leaf(name: str, x: Any, p: Any, want: tuple, why: str, hp: Any) -> None:
    cd = dtype_name(compute_dtype(p.dtype, jax.numpy))
    if tuple(getattr(x, "shape", (None,))) != want or dtype_name(getattr(x, "dtype", "")) != cd:
        context = f"direction={hp.direction!r}, paradigm={hp.paradigm!r}"
        raise invalid(name, _describe(x), f"shape {want} and dtype {cd}{why} for this param ({context}; was the "
                      "state saved for another model or with other settings?)")


def anchor_tree(anchors: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    """``[(path, x), ...]`` -> nested dicts keyed by each path entry as a string: ``DualOptState.anchor``.

    Examples
    --------
    >>> anchor_tree([(("backbone", 0, "kernel"), 1), (("backbone", 0, "bias"), 2)])
    {'backbone': {'0': {'kernel': 1, 'bias': 2}}}
    """
    tree: dict[str, Any] = {}
    for path, value in anchors:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def anchors_by_path(anchor: Any) -> dict[str, Any]:
    """``DualOptState.anchor`` as ``{path_str: array}``, whether it is nested or keyed flat by path strings."""
    return dict(zip((path_str(p) for p in leaf_paths(anchor)), jax.tree_util.tree_leaves(anchor)))
