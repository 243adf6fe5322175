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
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from decoupled_core import compute_dtype, dtype_name, invalid

from ._optax_config import LeafConfig
from ._optax_tree import leaf_paths, path_str

__all__ = ["STATE_FIELDS", "check_state"]

#: ``DualOptState``'s fields, in order (the state's format; see ``dualopt.optax.DualOptState``).
STATE_FIELDS = ("count", "skipped", "mu", "nu", "anchor")


def _describe(x: Any) -> str:
    return f"<array of shape {tuple(x.shape)} and dtype {dtype_name(x.dtype)}>"


def check_state(state: Any, params: Any, configs: Sequence[LeafConfig]) -> None:
    """Raise the spec's ``"<name>=<value> is invalid: expected <accepted>."`` for a state that does not fit.

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
    for name in ("mu", "nu", "anchor"):
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
    for name in ("mu", "nu", "anchor"):
        for cfg, p, x in zip(configs, leaves, treedef.flatten_up_to(getattr(state, name))):
            cd = dtype_name(compute_dtype(p.dtype, jax.numpy))
            hp = cfg.hp
            if name == "mu" or (name == "nu" and hp.direction == "adam") or (name == "anchor" and hp.paradigm == "finetune"):
                want, why = tuple(p.shape), ""
            else:
                want = (0,)
                why = (" (an empty placeholder: direction='sgd' has no second moment)" if name == "nu" else
                       f" (an empty placeholder: paradigm={hp.paradigm!r} has no anchor)")
            if tuple(x.shape) != want or dtype_name(x.dtype) != cd:
                context = f"direction={hp.direction!r}, paradigm={hp.paradigm!r}"
                raise invalid(f"state.{name}[{path_str(cfg.path)!r}]", _describe(x),
                              f"shape {want} and dtype {cd}{why} for this param ({context}; was the state saved "
                              "for another model or with other settings?)")
