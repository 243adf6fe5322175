"""Checks that a state passed to :func:`dualopt.optax.dualopt`'s ``update`` belongs to these params.

A restored checkpoint is matched to its template by keys, not shapes, so a
state saved for another model or with other settings would otherwise surface
as an obscure broadcasting error, or not at all (a float32 state promoted by
float64 params); spec section 6 asks for a message naming the parameter. The
layout checks read only shapes, dtypes and tree structures: free under
``jax.jit``. :func:`check_values` reads values (eager only).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from decoupled_core import compute_dtype, dtype_name, invalid

from ._config import LeafConfig
from ._tree import leaf_paths, path_str

__all__ = ["STATE_FIELDS", "AnchorsStandIn", "check_params", "sgd_nu_shape", "state_anchors", "check_values", "anchor_tree",
           "anchors_by_path"]

#: ``DualOptState``'s fields, in order (the state's format; see ``dualopt.optax.DualOptState``).
STATE_FIELDS = ("count", "skipped", "mu", "nu", "anchor")

# A state of the earlier layout packed small anchors in flatten order into a sixth field: no reader is shipped.
_MIGRATE = ("a DualOptState with the fields ('count', 'skipped', 'mu', 'nu', 'anchor'): this state has the earlier "
            "layout, whose small finetune anchors were packed into 'packed_anchor'. To migrate, load it with the "
            "dualopt version that saved it, take dualopt.optax.anchors(tx, state, params) as the new 'anchor' field "
            "and drop 'packed_anchor'; or call tx.init on the pretrained params")


class AnchorsStandIn:
    """``init``'s ``anchor`` for params without leaves (``optax.tree_map_params``'s stand-in): one leaf for the
    anchors, which are not params-shaped; ``tree_map_params`` hands the real ones to ``transform_non_params``."""

    def __repr__(self) -> str:
        return "<the finetune anchors>"


def check_params(configs: Sequence[LeafConfig], leaves: Sequence[Any]) -> None:
    """Spec section 7: real floating-point leaves only; complex and integer ones are refused."""
    for cfg, p in zip(configs, leaves):
        dt = jax.numpy.dtype(p.dtype)
        if not jax.numpy.issubdtype(dt, jax.numpy.floating):
            raise invalid(f"params[{path_str(cfg.path)!r}]", f"<{dtype_name(dt)} array>",
                          "a real floating-point array (float16, bfloat16, float32 or float64): complex and "
                          "integer params are out of scope (spec section 7)")


def sgd_nu_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of an SGD leaf's empty ``nu`` placeholder: zero elements, the param's rank (at least 1), so that
    the param's sharding fits it; a leaf, not an empty node, so that a checkpoint restored without a template has it.

    Examples
    --------
    >>> sgd_nu_shape((3, 4)), sgd_nu_shape(())
    ((0, 0), (0,))
    """
    return (0,) * max(len(shape), 1)


def _describe(x: Any) -> str:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return f"<{type(x).__name__}>"
    return f"<array of shape {tuple(x.shape)} and dtype {dtype_name(x.dtype)}>"


def state_anchors(state: Any, params: Any, configs: Sequence[LeafConfig]) -> list[Any]:
    """Each leaf's anchor (flatten order; None for non-finetune leaves), matched by path; raises the spec's
    ``"<name>=<value> is invalid: expected <accepted>."`` for a state that does not fit.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from dualopt.optax import dualopt
    >>> params = {"w": jnp.ones(3)}
    >>> tx = dualopt(0.1)
    >>> tx.update(params, optax.adam(0.1).init(params), params)
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: state='<tuple>' is invalid: expected a DualOptState with fields ('count', 'skipped', 'mu', 'nu', 'anchor') from this transform's init (the state of another optax transform cannot be used).
    """
    fields = getattr(state, "_fields", None)
    if isinstance(fields, tuple) and "packed_anchor" in fields:
        raise invalid("state.packed_anchor", "<present>", _MIGRATE)
    if fields != STATE_FIELDS:
        raise invalid("state", f"<{type(state).__name__}>",
                      f"a DualOptState with fields {STATE_FIELDS} from this transform's init "
                      "(the state of another optax transform cannot be used)")
    for name in ("count", "skipped"):
        x = getattr(state, name)
        if getattr(x, "shape", None) != () or "int" not in dtype_name(getattr(x, "dtype", "")):
            raise invalid(f"state.{name}", x if not hasattr(x, "shape") else _describe(x), "a 0-d integer array")
        # t = count + 1 <= 0 would make a bias correction zero or negative (traced under jit: see _transform)
        if not isinstance(x, jax.core.Tracer) and int(x) < 0:
            raise invalid(f"state.{name}", int(x), "a count >= 0 (updates applied or skipped so far; a corrupted or "
                          "hand-edited checkpoint?)")
    treedef: Any = jax.tree_util.tree_structure(params)
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
    check_params(configs, leaves)
    for name in ("mu", "nu"):
        for cfg, p, x in zip(configs, leaves, treedef.flatten_up_to(getattr(state, name))):
            hp = cfg.hp
            if name == "mu" or hp.direction == "adam":
                want, why = tuple(p.shape), ""
            else:
                want, why = sgd_nu_shape(p.shape), " (an empty placeholder: direction='sgd' has no second moment)"
            _check_leaf(f"state.{name}[{path_str(cfg.path)!r}]", x, p, want, why, hp)
    finetune = {path_str(c.path): (c, p) for c, p in zip(configs, leaves) if c.hp.paradigm == "finetune"}
    if isinstance(state.anchor, AnchorsStandIn) and not finetune:
        return [None] * len(configs)
    bare = len(configs) == 1 and configs[0].path == () and hasattr(state.anchor, "shape")  # see anchor_tree
    if not isinstance(state.anchor, dict) and not bare:
        raise invalid("state.anchor", f"<{type(state.anchor).__name__}>",
                      "a dict of the finetune anchors (a DualOptState from this version's init)")
    by_path = anchors_by_path(state.anchor)
    if set(by_path) != set(finetune):
        missing, extra = sorted(set(finetune) - set(by_path)), sorted(set(by_path) - set(finetune))
        what = (f"<pytree without the finetune param {missing[0]!r}>" if missing else
                f"<pytree with the leaf {extra[0]!r}, not a finetune param of these params>")
        raise invalid("state.anchor", what,
                      f"one anchor per finetune leaf ({len(finetune)}), keyed by its path (was the state saved for "
                      "another model or with other paradigms? A state of the earlier layout kept the anchors of "
                      "small leaves in 'packed_anchor': call tx.init on the pretrained params, or move them with "
                      "the version that saved it)")
    for key, (cfg, p) in finetune.items():
        _check_leaf(f"state.anchor[{key!r}]", by_path[key], p, tuple(p.shape), "", cfg.hp)
    return [by_path[path_str(c.path)] if c.hp.paradigm == "finetune" else None for c in configs]


def check_values(state: Any, configs: Sequence[LeafConfig], anchors: Sequence[Any]) -> None:
    """The values a compiled update cannot read: every moment and anchor finite, Adam's ``v`` not negative."""
    treedef: Any = jax.tree_util.tree_structure(state.mu)
    for cfg, m, v, a in zip(configs, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu), anchors):
        key = path_str(cfg.path)
        named = [("mu", m), ("nu", v)] if cfg.hp.direction == "adam" else [("mu", m)]
        for name, x in named + ([("anchor", a)] if a is not None else []):
            if isinstance(x, jax.core.Tracer):
                raise invalid("state", "<traced>", "concrete arrays: dualopt.optax.check_state reads the values, "
                              "call it outside jax.jit")
            bad = int(jax.numpy.size(x) - jax.numpy.sum(jax.numpy.isfinite(x)))
            if bad:
                raise invalid(f"state.{name}[{key!r}]", f"<array with {bad} non-finite values>",
                              "finite values (a diverged run or a damaged checkpoint?)")
            if name == "nu" and bool(jax.numpy.any(x < 0)):
                raise invalid(f"state.nu[{key!r}]", "<array with negative values>",
                              "Adam's second moment, which is never negative (a damaged checkpoint?)")


def _check_leaf(name: str, x: Any, p: Any, want: tuple, why: str, hp: Any) -> None:
    cd = dtype_name(compute_dtype(p.dtype, jax.numpy))
    if tuple(getattr(x, "shape", (None,))) != want or dtype_name(getattr(x, "dtype", "")) != cd:
        context = f"direction={hp.direction!r}, paradigm={hp.paradigm!r}"
        raise invalid(name, _describe(x), f"shape {want} and dtype {cd}{why} for this param ({context}; was the "
                      "state saved for another model or with other settings?)")


def anchor_tree(anchors: Sequence[tuple[Any, Any]]) -> Any:
    """``[(path, x), ...]`` -> nested dicts keyed by each path entry as a string: ``DualOptState.anchor``.

    Params that are one bare array (path ``()``) get that array itself, not a dict.

    Examples
    --------
    >>> anchor_tree([(("backbone", 0, "kernel"), 1), (("backbone", 0, "bias"), 2)])
    {'backbone': {'0': {'kernel': 1, 'bias': 2}}}
    """
    tree: dict[str, Any] = {}
    for path, value in anchors:
        if not path:  # the params are one bare array: its anchor is that array, keyed by the empty path
            return value
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def anchors_by_path(anchor: Any) -> dict[str, Any]:
    """``DualOptState.anchor`` as ``{path_str: array}``, whether it is nested or keyed flat by path strings."""
    return dict(zip((path_str(p) for p in leaf_paths(anchor)), jax.tree_util.tree_leaves(anchor)))
