"""DualOpt for Optax: one ``GradientTransformationExtraArgs``, used exactly like ``optax.adamw``.

>>> import jax, jax.numpy as jnp, optax
>>> from dualopt.optax import dualopt
>>> params = {"backbone": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}},
...           "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
>>> tx = dualopt(1e-3, paradigm={"backbone": "finetune", "head": "scratch"}, layer_index="module")
>>> state = tx.init(params)          # snapshots the finetune anchors
>>> @jax.jit
... def step(params, state, grads):
...     updates, state = tx.update(grads, state, params)
...     return optax.apply_updates(params, updates), state
>>> grads = jax.tree.map(jnp.ones_like, params)
>>> params, state = step(params, state, grads)
>>> int(state.count), int(state.skipped)
(1, 0)

The rule (spec ``spec/SPEC.md``): per leaf, Adam or heavy-ball SGD gives the
pre-weight ``pre = theta - eta*u``, then the pull ``theta = pre - c*(pre - a)``
with ``c = clip(eta*rho_l, 0, 1)``; ``a`` is 0 for ``paradigm="scratch"``
(``rho_l`` grows with depth) and the anchor captured by ``init`` for
``"finetune"`` (``rho_l`` shrinks with depth); ``"none"`` has no pull.

Layer numbering. JAX flattens dicts in sorted key order (``Dense_10`` before
``Dense_2``), so depth is never taken from flatten order. By default every leaf
is its own layer in the canonical order of spec section 3 that torch and Keras
also follow (:func:`decoupled_core.canonical_order`): modules in definition
order as their names number them (``layers_2 < layers_10``), and within a
module the kernel / weight / scale first and the bias / offset last. Where the
names do not give the order (``encoder`` beside ``head``, linen's ``Conv_0``
beside ``BatchNorm_0``), ``init`` and :func:`layer_rates` warn
(:class:`decoupled_core.LayerOrderWarning`): give the module paths in
definition order, ``layer_index=["Conv_0", "BatchNorm_0", "Conv_1"]``.
``layer_index="module"`` makes a module's leaves share a layer
(:func:`natural_layer_index`); any numbering can be given as a pytree of ints
or a function of the key path. Within each paradigm the distinct layer keys
are sorted: ``l`` is a key's rank and ``L`` their count.

With ``optax.inject_hyperparams``: pass function-valued arguments
(``paradigm``, ``layer_index``, a per-path rate) and an ``int``
``layer_index`` through ``static_args`` (Optax calls any other callable as a
schedule). Optax casts injected numbers to the params' dtype (``b1 = 0.9``
becomes ``float32(0.9)``, as in ``optax.adam``); keep ``b1``/``b2`` in
``static_args`` or use ``hyperparam_dtype=jnp.float64`` (x64 on) for exact
arithmetic; assign ``jnp.asarray(v, state.hyperparams[k].dtype)`` to change one
without a recompile. :func:`layer_rates` and :func:`anchors` accept such a transform,
or an ``optax.chain`` holding it.

After restoring a state from a checkpoint, call :func:`check_state` once.

Only ``jax`` and ``optax`` are imported here (never torch or tensorflow).
"""

from ._transform import dualopt, DualOptState, step, anchors, check_state, layer_rates, natural_layer_index, natural_key, leaf_paths, path_str, Path

__all__ = ['dualopt', 'DualOptState', 'step', 'anchors', 'check_state', 'layer_rates', 'natural_layer_index', 'natural_key', 'leaf_paths', 'path_str', 'Path']
