"""The DualOpt GradientTransformation and its helpers (the public names are re-exported by :mod:`dualopt.optax`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from decoupled_core import check_anchor, compute_dtype, init_anchor, invalid

from ._config import HP_ARGS, Settings, check_settings, is_schedule, resolve_anchors, resolve_leaves
from ._step import step_leaves
from .._shared.jax import all_finite
from ._state import AnchorsStandIn, anchor_tree, check_params, check_values, sgd_nu_shape, state_anchors
from ._tree import Path, leaf_paths, natural_key, natural_layer_index, path_str

__all__ = ["dualopt", "DualOptState", "step", "anchors", "check_state", "layer_rates", "natural_layer_index", "natural_key",
           "leaf_paths", "path_str", "Path"]

Setting = Any
"""A single value, a pytree whose structure is a prefix of the params', or a function of the key path."""


class DualOptState(NamedTuple):
    """State of :func:`dualopt`: a NamedTuple pytree of arrays (checkpoint friendly).

    Attributes
    ----------
    count : int32 array
        Updates applied; the next update's step is ``t = count + 1`` and a
        schedule is evaluated at ``count``. A negative count (a corrupted
        checkpoint) is refused eagerly (:func:`check_state`); under
        ``jax.jit``, ``nonfinite="skip"`` skips the update instead.
    skipped : int32 array
        Updates skipped by ``nonfinite="skip"``.
    mu, nu : pytree
        With the params' structure, in the compute dtype (float32 for
        float16/bfloat16 params): Adam's ``m`` and ``v``, or SGD's buffer and
        an empty placeholder of the param's rank (shape ``(0, 0)`` for a
        matrix, so that the param's sharding fits it).
    anchor : dict
        Every finetune leaf's anchor (its param's shape, sharded like it),
        nested by key path as strings
        (``state.anchor["backbone"]["encoder"]["kernel"]``; ``{}`` when there
        are none); a restored state may key them flat by :func:`path_str`.
        :func:`anchors` gives them for any params structure. They are not
        params-shaped: ``optax.tree_map_params`` hands them to
        ``transform_non_params``.
    """

    count: Any
    skipped: Any
    mu: Any
    nu: Any
    anchor: Any


def dualopt(
    learning_rate: float | Callable[[Any], Any],
    *,
    direction: Setting = "adam",
    b1: Setting = 0.9,
    b2: Setting = 0.999,
    eps: Setting = 1e-8,
    momentum: Setting = 0.9,
    nesterov: Setting = False,
    paradigm: Setting = "scratch",
    weight_decay: Setting = 1e-2,
    rollback_max: Setting = None,
    rollback_min: Setting = 0.0,
    rollback_power: Setting = 1.0,
    layer_index: Any = None,
    anchor: Any = None,
    nonfinite: str = "skip",
    base_learning_rate: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DualOpt as an Optax transform whose updates are ``new_params - params``.

    Parameters
    ----------
    learning_rate : float or optax schedule
        eta_t; a schedule is called with the update count (0 on the first update).
    direction : {"adam", "sgd"}, setting
        The direction that gives the pre-weight.
    b1, b2, eps : float, setting
        Adam's betas and epsilon (``denom = sqrt(v)*inv_sqrt_bc2 + eps``).
    momentum, nesterov : float, bool, setting
        Heavy-ball SGD: ``b = mu*b + g``; ``u = g + mu*b`` if ``nesterov`` else ``b``.
    paradigm : {"scratch", "finetune", "none"}, setting
        Per leaf: pull toward 0 (layer-wise pre-weight decay), toward the
        anchor (weight rollback), or no pull.
    weight_decay : float, setting
        Scratch: ``rho_l = weight_decay * (l + 1) / L``.
    rollback_max, rollback_min, rollback_power : float, setting
        Finetune: ``rho_l = min + (1 - l/(L-1))**power * (max - min)`` (``max``
        when ``L == 1``). ``rollback_max=None`` means ``0.01 / eta_0`` with
        ``eta_0`` the base learning rate (spec section 2): ``base_learning_rate``
        when given, else the number, else ``schedule(0)``; give it explicitly
        when the learning rate is an array (``optax.inject_hyperparams``).
    layer_index : None, "leaf", "module", list of module paths, int, pytree of int, or function of the key path
        Layer keys (see the module docstring). ``None`` (= ``"leaf"``): every
        leaf its own layer in the canonical order of spec section 3.
    anchor : pytree, optional
        Finetune anchors with the params' structure (``None`` entries and
        non-finetune leaves are ignored / snapshotted); default: ``init``'s params.
    nonfinite : {"skip", "propagate"}
        ``"skip"``: an update whose gradients hold any NaN/Inf returns zero
        updates (``-0.0``, so params keep their bits) and leaves the state
        unchanged except ``skipped += 1``; works under ``jax.jit`` (a select,
        not a branch). The check sees the gradients this transform receives:
        inside ``optax.chain``, those after any clipping before it
        (``optax.clip`` maps +-Inf to finite values; NaN stays NaN); it costs
        one read of the gradients. ``"propagate"``: no check.
    base_learning_rate : float, optional
        eta_0 of a schedule: its peak (``peak_value`` of
        ``optax.warmup_cosine_decay_schedule``). Needed for the default
        ``rollback_max`` when the schedule starts at 0 (warmup).

    A *setting* is a single value, a pytree whose structure is a prefix of the
    params' (``{"backbone": "finetune", "head": "scratch"}``), or a function of
    the key path (a tuple of plain keys, see :func:`leaf_paths`).

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``update`` needs ``params``: ``tx.update(grads, state, params)``.

    Raises
    ------
    decoupled_core.HyperparameterError
        ``"<name>=<value> is invalid: expected <accepted>."`` for a bad argument
        (at construction where the params are not needed, else at ``init``).

    Examples
    --------
    Backbone finetuned toward its pretrained weights, new head trained from
    scratch, one layer per module, chosen by key path:

    >>> import jax.numpy as jnp
    >>> params = {"backbone": {"layers_0": {"w": jnp.ones(2)}, "layers_10": {"w": jnp.ones(2)},
    ...                        "layers_2": {"w": jnp.ones(2)}}, "head": {"w": jnp.zeros(2)}}
    >>> tx = dualopt(0.1, rollback_max=0.5, weight_decay=0.1, layer_index="module",
    ...              paradigm=lambda path: "finetune" if path[0] == "backbone" else "scratch")
    >>> layer_rates(tx, params)  # rho_l per leaf; layers_2 sits between layers_0 and layers_10
    {'backbone/layers_0/w': 0.5, 'backbone/layers_10/w': 0.0, 'backbone/layers_2/w': 0.25, 'head/w': 0.1}
    >>> state = tx.init(params)
    >>> found = anchors(tx, state, params)  # finetune leaves only
    >>> found["backbone"]["layers_2"]["w"].tolist(), "head" in found, state.anchor["backbone"]["layers_2"]["w"].shape
    ([1.0, 1.0], False, (2,))
    """
    hyper = {"direction": direction, "b1": b1, "b2": b2, "eps": eps, "momentum": momentum, "nesterov": nesterov,
             "paradigm": paradigm, "weight_decay": weight_decay, "rollback_max": rollback_max,
             "rollback_min": rollback_min, "rollback_power": rollback_power}
    settings = Settings(learning_rate=learning_rate, hyper=hyper, layer_index=layer_index, anchor=anchor,
                        nonfinite=nonfinite, base_learning_rate=base_learning_rate)
    check_settings(settings)
    schedule = is_schedule(learning_rate)

    def init_fn(params: Any) -> DualOptState:
        configs, paths = resolve_leaves(settings, params, warn=True)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        check_params(configs, leaves)
        given = resolve_anchors(anchor, params, paths)
        mu, nu, anchors = [], [], {}  # anchors: path string -> (path, anchor)
        for cfg, p, a in zip(configs, leaves, given):
            dt = compute_dtype(p.dtype, jnp)
            mu.append(jnp.zeros_like(p, dtype=dt))
            adam = cfg.hp.direction == "adam"
            nu.append(jnp.zeros_like(p, dtype=dt) if adam else jnp.zeros(sgd_nu_shape(p.shape), dt))
            key = path_str(cfg.path)
            if cfg.hp.paradigm != "finetune":
                continue
            if key in anchors:  # e.g. {"a/b": x} next to {"a": {"b": y}}
                raise invalid("params", f"<pytree with two finetune leaves at {key!r}>",
                              "finetune leaves whose key paths, as strings joined by '/', are distinct "
                              "(they key the anchors)")
            if a is None:
                if isinstance(p, jax.ShapeDtypeStruct):  # zeros can be made from a shape; an anchor cannot
                    raise invalid("params", f"<jax.ShapeDtypeStruct at {key!r}>",
                                  "arrays for finetune leaves, whose values become the anchors: call tx.init on "
                                  "the pretrained params, use jax.eval_shape(tx.init, abstract_params) for the "
                                  "state's shapes, or pass the anchors with the anchor argument")
                value = init_anchor(p, xp=jnp)
            else:  # straight to the compute dtype: a float32 anchor of a bfloat16 leaf must not round
                check_anchor(f"anchor[{key!r}]", tuple(jnp.shape(a)), getattr(a, "dtype", dt),
                             tuple(p.shape), p.dtype)
                value = init_anchor(jnp.asarray(a, dtype=dt), xp=jnp)
            anchors[key] = (cfg.path, value)
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        if not leaves and not isinstance(params, (dict, list, tuple)) and params is not None:
            anchor_field: Any = AnchorsStandIn()  # optax.tree_map_params's placeholder
        else:
            anchor_field = anchor_tree(list(anchors.values()))
        # Distinct buffers everywhere (never one zero shared by two leaves): a state passed
        # through jax.jit(..., donate_argnums=...) must not donate the same buffer twice.
        return DualOptState(count=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32), mu=unflat(mu),
                            nu=unflat(nu), anchor=anchor_field)

    def apply_fn(updates: Any, state: DualOptState, params: Any, output: str) -> tuple[Any, DualOptState]:
        if params is None:
            raise ValueError("dualopt needs the params (the pull acts on them): call tx.update(grads, state, params).")
        configs, _ = resolve_leaves(settings, params)
        anchors = state_anchors(state, params, configs)  # static shapes/dtypes only: free under jit
        treedef: Any  # jax's stubs lack PyTreeDef.flatten_up_to
        leaves, treedef = jax.tree_util.tree_flatten(params)
        grads = treedef.flatten_up_to(updates)
        mu = treedef.flatten_up_to(state.mu)
        nu = treedef.flatten_up_to(state.nu)
        lr = learning_rate(state.count) if callable(learning_rate) and schedule else learning_rate
        t = optax.safe_increment(state.count)
        # A negative count (a corrupted checkpoint) cannot be read under jit: "skip" skips it like a
        # non-finite gradient (t <= 0 would make a bias correction zero or negative).
        keep = all_finite(grads, count=state.count) if nonfinite == "skip" else None
        out, new_mu, new_nu = step_leaves(configs, leaves, grads, mu, nu, anchors, lr=lr, t=t, keep=keep,
                                          output=output)
        if keep is not None:
            count = jnp.where(keep, t, state.count)
            skipped = jnp.where(keep, state.skipped, optax.safe_increment(state.skipped))
        else:
            count, skipped = t, state.skipped
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        new_state = DualOptState(count=count, skipped=skipped, mu=unflat(new_mu), nu=unflat(new_nu),
                                 anchor=state.anchor)
        return unflat(out), new_state

    def update_fn(updates: Any, state: DualOptState, params: Any = None, **extra_args: Any) -> tuple[Any, DualOptState]:
        del extra_args
        return apply_fn(updates, state, params, "updates")

    def step_fn(grads: Any, state: DualOptState, params: Any) -> tuple[Any, DualOptState]:
        return apply_fn(grads, state, params, "params")

    init_fn._dualopt_settings = settings  # type: ignore[attr-defined]  # read by layer_rates
    update_fn._dualopt_step = step_fn  # type: ignore[attr-defined]  # read by step
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step(tx: optax.GradientTransformation, grads: Any, state: DualOptState, params: Any) -> tuple[Any, DualOptState]:
    """``(new_params, new_state)`` of ``tx`` from :func:`dualopt`, without the ``updates`` round trip.

    ``params + (new - params)`` (``tx.update`` then ``optax.apply_updates``)
    can differ from ``new`` in the last bit; this returns ``new`` itself, the
    spec's result bit for bit when eager. The state is ``tx.update``'s. Pure
    and jittable.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> tx = dualopt(0.1, direction="sgd", momentum=0.0, paradigm="none")
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> params, state = step(tx, {"w": jnp.array([1.0, -1.0])}, tx.init(params), params)
    >>> params["w"].tolist()
    [0.8999999761581421, 2.0999999046325684]
    """
    fn = getattr(getattr(tx, "update", None), "_dualopt_step", None)
    if fn is None:
        raise invalid("tx", type(tx).__name__, "a transform returned by dualopt.optax.dualopt")
    return fn(grads, state, params)


def anchors(tx: optax.GradientTransformation, state: DualOptState, params: Any) -> dict[str, Any]:
    """Every finetune leaf's anchor (compute dtype), nested by key path as strings: for dict params, the params'
    tree without its other leaves. Raises like ``tx.update`` when ``state`` does not fit ``tx`` and ``params``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.zeros(2)}}
    >>> tx = dualopt(0.1, paradigm={"backbone": "finetune", "head": "scratch"})
    >>> state = tx.init(params)
    >>> anchors(tx, state, params)["backbone"]["w"].tolist(), "head" in anchors(tx, state, params)
    ([1.0, 1.0], False)
    """
    configs, _ = resolve_leaves(_settings_of(tx), params)
    found = state_anchors(_dualopt_state_in(state), params, configs)
    return anchor_tree([(c.path, a) for c, a in zip(configs, found) if a is not None])


def check_state(tx: optax.GradientTransformation, state: Any, params: Any) -> None:
    """Check a state restored from a checkpoint (Orbax, ``flax.serialization``...) before training on.

    Raises what ``tx.update`` raises for a state that does not fit ``tx`` and
    ``params`` (structure, shapes, dtypes, anchors), and checks what a jitted
    update cannot read: ``count`` and ``skipped`` not negative, moments and
    anchors finite, Adam's ``v`` not negative. (Under ``jax.jit`` a negative
    ``count`` is skipped and counted in ``skipped`` by ``nonfinite="skip"``;
    with ``"propagate"`` it makes the Adam weights NaN.) Eager only.

    Parameters
    ----------
    tx : optax.GradientTransformation
        The transform from :func:`dualopt`, or an ``optax.chain`` /
        ``inject_hyperparams`` transform holding it.
    state : DualOptState, or a state holding exactly one
        The restored state.
    params : pytree
        The params it is used with.

    Raises
    ------
    decoupled_core.HyperparameterError
        ``"state.<field>=<value> is invalid: expected <what>."``

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones(2)}
    >>> tx = dualopt(0.1)
    >>> state = tx.init(params)
    >>> check_state(tx, state, params)
    >>> check_state(tx, state._replace(count=jnp.asarray(-1, jnp.int32)), params)
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: state.count=-1 is invalid: expected a count >= 0 (updates applied or skipped so far; a corrupted or hand-edited checkpoint?).
    """
    configs, _ = resolve_leaves(_settings_of(tx), params)
    state = _dualopt_state_in(state)
    check_values(state, configs, state_anchors(state, params, configs))


def _settings_of(tx: Any) -> Settings:
    """The settings of the one :func:`dualopt` transform ``tx`` is or holds (``optax.chain``,
    ``inject_hyperparams``): Optax keeps them only in closures, read here (guarded by tests)."""
    found: list[Settings] = []
    _collect_settings(getattr(tx, "init", None), found, set(), 0)
    if len(found) != 1:
        raise invalid("tx", type(tx).__name__,
                      "a transform returned by dualopt.optax.dualopt, or an optax.chain / inject_hyperparams "
                      f"transform holding exactly one of them (found {len(found)})")
    return found[0]


def _collect_settings(fn: Any, found: list, seen: set, depth: int) -> None:
    settings = getattr(fn, "_dualopt_settings", None)
    if settings is not None:  # counted at every occurrence: a chain holding one transform twice has two
        found.append(settings)
        return
    if fn is None or id(fn) in seen or depth > 8:
        return
    seen.add(id(fn))
    if hasattr(fn, "init") and callable(getattr(fn, "init")):  # a GradientTransformation in a closure
        _collect_settings(fn.init, found, seen, depth + 1)
        return
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return
    env = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells) if _filled(cell)}
    if env.get("inner_factory") is dualopt:  # optax.inject_hyperparams(dualopt)(...)
        kwargs = {**env.get("other_hps", {}), **env.get("numeric_hps", {})}
        for k, sched in env.get("sched_hps", {}).items():
            kwargs[k] = getattr(sched, "schedule_fn", sched)
        found.append(_settings_of(dualopt(**kwargs)))
        return
    for value in env.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if callable(item) or hasattr(item, "init"):
                _collect_settings(item, found, seen, depth + 1)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _dualopt_state_in(state: Any) -> Any:
    """The :class:`DualOptState` inside a chain's tuple or an ``inject_hyperparams`` state."""
    if isinstance(state, DualOptState):
        return state
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, DualOptState))
             if isinstance(s, DualOptState)]
    if len(found) != 1:
        raise invalid("state", type(state).__name__, f"a state holding exactly one DualOptState (found {len(found)})")
    return found[0]


def layer_rates(tx: optax.GradientTransformation, params: Any) -> dict[str, Any]:
    """rho_l of every leaf (``{"path/str": rate}``, flatten order) that ``tx`` uses on ``params``: check a layer
    numbering before training (see :func:`dualopt`'s example)."""
    configs, paths = resolve_leaves(_settings_of(tx), params, warn=True)
    return {path_str(p): c.rate for p, c in zip(paths, configs)}
