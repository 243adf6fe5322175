"""The DualOpt Keras optimizer class (re-exported by :mod:`dualopt.keras`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from decoupled_core import (AdamState, HyperParams, SGDState, accepted, all_finite, check_anchor, compute_dtype,
                            init_anchor, invalid, number_layers, pull_rate, resolve_rollback_max, step_tensor, validate,
                            warn_finetune_weight_decay)

from ._layout import (PARADIGM_ALSO_ACCEPTED, check_layer_index_spec, check_paradigm_spec, check_saved_counts,
                            resolve_layer_keys, resolve_paradigms, variable_path)
from ._xp import KERAS_XP

__all__ = ["DualOpt"]

_NAMES = {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"}
#: Forms accepted besides the core's range (appended to the core's messages by ``decoupled_core.accepted``).
_ALSO = {"lr": ("a LearningRateSchedule",), "paradigm": PARADIGM_ALSO_ACCEPTED}
_PARADIGM_CODE = {"scratch": 1, "finetune": 2, "none": 3}
_CALLABLE = "__callable__"  # marks a serialized callable in get_config (a plain mapping never has this key)
_CONFIG_KEYS = ("direction", "beta_1", "beta_2", "epsilon", "momentum", "nesterov", "paradigm", "default_paradigm",
                "weight_decay", "rollback_max", "rollback_min", "rollback_power", "layer_index", "nonfinite",
                "base_learning_rate")


@dataclass(frozen=True)
class _VariableFacts:
    """What build() decided for one trainable variable (keyed by ``_get_variable_index``)."""

    path: str
    paradigm: str
    layer: int
    rate: float
    hp: HyperParams
    compute_dtype: str
    slots: tuple  # (m, v) for adam, (momentum,) for sgd
    anchor: Any  # keras.Variable or None


class _Runtime:
    """Per-call values, in a plain object so that Keras's attribute tracking leaves them alone."""

    skips_before: Any = None  # ``skipped`` before this apply (EMA under nonfinite="skip")
    #: The state load_weights() gave before build (by position); build() checks it and restores it
    #: (``restoring`` while it creates the variables).
    deferred_state: list[np.ndarray] | None = None
    restoring: list[np.ndarray] | None = None


def _is_schedule(lr: Any) -> bool:
    return isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) or callable(lr)


def _initial_lr(lr: Any, peak: bool = False) -> float:
    """A float; a schedule's value at step 0, or with ``peak`` (eta_0 of spec section 2) the peak that
    Keras's warming-up schedules name, ``warmup_target`` (``CosineDecay(0.0, warmup_target=...)``)."""
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        target = getattr(lr, "warmup_target", None) if peak else None
        return float(ops.convert_to_numpy(lr(0) if target is None or callable(target) else target))
    return float(ops.convert_to_numpy(lr())) if callable(lr) else float(lr)


def _serialize_spec(spec: Any) -> Any:
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return {_CALLABLE: keras.saving.serialize_keras_object(spec)}
    if isinstance(spec, Mapping):
        return {str(k): (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [int(k) for k in spec]
    return spec


def _deserialize_spec(spec: Any) -> Any:
    if isinstance(spec, Mapping) and _CALLABLE in spec:
        return keras.saving.deserialize_keras_object(spec[_CALLABLE])
    return spec


@keras.saving.register_keras_serializable(package="dualopt")
class DualOpt(keras.optimizers.Optimizer):
    """DualOpt: an Adam or SGD direction, then a layer-wise pull (rollback or real-time decay).

    For every variable θ with gradient g (spec section 4)::

        pre = θ - step_size * m / (sqrt(v) * inv_sqrt_bc2 + epsilon)   (adam; sgd: θ - lr * momentum buffer)
        θ   = pre - c * (pre - anchor),  c = clip(learning_rate * rho_l, 0, 1)

    with ``anchor = 0`` for ``"scratch"`` (rho_l = weight_decay * (l+1)/L, deeper
    layers decay more), the weights at build time for ``"finetune"``
    (rho_l = rollback_min + (1 - l/(L-1))**rollback_power * (rollback_max -
    rollback_min), shallow layers roll back more) and no pull for ``"none"``.

    Parameters
    ----------
    learning_rate : float or keras.optimizers.schedules.LearningRateSchedule
        eta_t. A schedule is evaluated at ``iterations`` (batches seen); its
        value at step 0 must be a finite float >= 0.
    direction : {"adam", "sgd"}
    beta_1, beta_2, epsilon : float
        Adam's moment decays and epsilon (``direction="adam"``).
    momentum : float
        Heavy-ball momentum (``direction="sgd"``).
    nesterov : bool
        Nesterov momentum (``direction="sgd"``).
    paradigm : str, mapping or callable
        ``"scratch"``, ``"finetune"`` or ``"none"`` for every variable; a mapping
        from layer name / variable path to paradigm; or ``f(variable)``
        returning a paradigm or None. See the module docstring for matching.
    default_paradigm : str
        The paradigm of variables that a mapping ``paradigm`` does not match
        (or for which a callable returns None).
    weight_decay : float
        lambda, the scratch paradigm's deepest-layer rate. Not Keras's weight
        decay, which is disabled (``weight_decay=None`` goes to the base class).
    rollback_max, rollback_min, rollback_power : float
        kappa_max (None: ``0.01 / eta_0``, resolved now and stored), kappa_min,
        p. eta_0 (spec section 2) is ``base_learning_rate`` when given, else the
        float, else a warm-up schedule's ``warmup_target``, else ``schedule(0)``.
    layer_index : None, "layer", sequence of int, mapping or callable
        Layer keys (module docstring). Default: one layer per variable in
        ``var_list`` order.
    anchor : mapping or sequence of arrays, optional
        Finetune anchors, by variable path or in ``var_list`` order; default:
        snapshot at build. Not part of ``get_config()``.
    nonfinite : {"skip", "propagate"}
        ``"skip"``: an apply call with any NaN/Inf gradient changes no variable,
        moment, anchor, ``t`` or EMA average and increments ``skipped``
        (``iterations`` still counts the batch). ``"propagate"``: no check.
    base_learning_rate : float, optional
        eta_0 of a schedule (its peak rate) for the default ``rollback_max``.
    **kwargs
        Keras base optimizer options: ``clipnorm``, ``clipvalue``,
        ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
        ``ema_overwrite_frequency``, ``loss_scale_factor``,
        ``gradient_accumulation_steps``, ``name`` (default: Keras's automatic
        unique name, ``dual_opt``, ``dual_opt_1``, ..., as for its own
        optimizers; slot paths start with it).

    Examples
    --------
    >>> import numpy as np, keras
    >>> w = keras.Variable(np.ones(2), name="w")
    >>> opt = DualOpt(learning_rate=0.1, paradigm="finetune")
    >>> opt.apply([np.array([1.0, -1.0])], [w])
    >>> np.round(keras.ops.convert_to_numpy(w), 4).tolist()
    [0.901, 1.099]
    >>> int(opt.step_count), int(opt.skipped)
    (1, 0)
    """

    def __init__(self, learning_rate: float | Any = 1e-3, direction: str = "adam", beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-8, momentum: float = 0.9, nesterov: bool = False,
                 paradigm: str | Mapping[str, str] | Callable[[Any], str | None] = "scratch",
                 default_paradigm: str = "scratch", weight_decay: float = 1e-2, rollback_max: float | None = None,
                 rollback_min: float = 0.0, rollback_power: float = 1.0, layer_index: Any = None,
                 anchor: Mapping[str, Any] | Sequence[Any] | None = None, nonfinite: str = "skip",
                 name: str | None = None, base_learning_rate: float | None = None, **kwargs: Any) -> None:
        given_lr = learning_rate  # messages quote the value as the user wrote it (np.float64(-0.001))
        if isinstance(learning_rate, (int, np.integer, np.floating)) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        schedule = _is_schedule(learning_rate)
        if not schedule and not isinstance(learning_rate, float):
            raise invalid("learning_rate", given_lr, accepted("lr", _ALSO["lr"]))
        candidates = check_paradigm_spec(paradigm, default_paradigm)
        check_layer_index_spec(layer_index)
        lr0 = _initial_lr(learning_rate)
        if schedule and not (np.isfinite(lr0) and lr0 >= 0):
            # A negative eta is gradient ascent and a NaN one poisons every weight (optax refuses both).
            raise invalid("learning_rate", f"<{type(given_lr).__name__} whose value at step 0 is {lr0!r}>",
                          "a schedule whose value at step 0 is a finite float >= 0")
        base = HyperParams(direction=direction, beta1=beta_1, beta2=beta_2, eps=epsilon, momentum=momentum,
                           nesterov=nesterov, weight_decay=weight_decay, rollback_max=rollback_max,
                           rollback_min=rollback_min, rollback_power=rollback_power)
        for p in candidates:
            validate(base.replace(paradigm=p), lr=None if schedule else given_lr, nonfinite=nonfinite, names=_NAMES,
                     also_accepted=_ALSO)
        if base_learning_rate is not None:
            if isinstance(base_learning_rate, bool) or not (isinstance(base_learning_rate, (int, float, np.number))
                                                            and np.isfinite(base_learning_rate)
                                                            and base_learning_rate > 0):
                raise invalid("base_learning_rate", base_learning_rate,
                              "None or a finite float > 0 (eta_0: a schedule's peak rate)")
            base_learning_rate = float(base_learning_rate)
        eta0 = base_learning_rate if base_learning_rate is not None else _initial_lr(learning_rate, peak=True)
        if rollback_max is None and "finetune" in candidates and eta0 > 0:
            rollback_max = resolve_rollback_max(None, eta0, names=_NAMES)
            validate(base.replace(paradigm="finetune", rollback_max=rollback_max), lr=None if schedule else lr0,
                     nonfinite=nonfinite, names=_NAMES, also_accepted=_ALSO)
        if weight_decay == 0 and "finetune" in candidates and "scratch" not in candidates:
            warn_finetune_weight_decay(where="a finetune optimizer", stacklevel=2)
        # Keras's own decay is not DualOpt's pull: the base class gets None and never decays.
        with _float64_learning_rate(schedule):
            super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.weight_decay = float(weight_decay)
        self.direction = direction
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.paradigm = paradigm if isinstance(paradigm, str) or callable(paradigm) else dict(paradigm)
        self.default_paradigm = default_paradigm
        self.rollback_max = None if rollback_max is None else float(rollback_max)
        self.rollback_min = float(rollback_min)
        self.rollback_power = float(rollback_power)
        self.layer_index = layer_index
        self.nonfinite = nonfinite
        self.base_learning_rate = base_learning_rate
        self._anchor_values = anchor
        self._runtime = _Runtime()
        # The torch backend's multi-tensor path (tests switch it off to compare with the generic path)
        # and its sizes (a dualopt.keras._torch.Policy; None: its defaults).
        self._use_fast_path = True
        self._fast_path_policy: Any = None
        self._facts: list[_VariableFacts] = []
        self._pending_anchors: tuple[int, ...] = ()  # indices of anchors taken at the first apply (build)

    # ------------------------------------------------------------------ build
    def _hyperparams(self, paradigm: str) -> HyperParams:
        return HyperParams(direction=self.direction, beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon,
                           momentum=self.momentum, nesterov=self.nesterov, paradigm=paradigm,
                           weight_decay=self.weight_decay, rollback_max=self.rollback_max,
                           rollback_min=self.rollback_min, rollback_power=self.rollback_power)

    built: bool  # Keras's flag (set by the base class)

    def build(self, var_list: Sequence[Any]) -> None:
        """Create the slots (module docstring, "Slot layout") and fix every variable's paradigm and rate."""
        if self.built:
            return
        var_list = list(var_list)
        _refuse_duplicates(self, var_list)
        for v in var_list:
            name = keras.backend.standardize_dtype(v.dtype)
            if name not in ("float16", "bfloat16", "float32", "float64"):
                raise invalid(f"var_list[{variable_path(v)!r}].dtype", name,
                              "a floating-point variable (float16, bfloat16, float32 or float64)")
        paradigms = resolve_paradigms(self.paradigm, self.default_paradigm, var_list)
        keys = resolve_layer_keys(self.layer_index, var_list)
        numbering = number_layers(paradigms, keys, name="layer_index")
        hps = {p: self._hyperparams(p) for p in set(paradigms)}
        if "finetune" in hps and self.rollback_max is None:
            # Only reachable with eta_0 == 0 at construction: the default needs a positive rate.
            if _is_schedule(self._learning_rate):
                raise invalid("rollback_max", None,
                              "an explicit value, or base_learning_rate=<the schedule's peak learning rate>: the "
                              "default rollback_max is 0.01/eta_0, and this schedule starts at 0 without naming "
                              "its peak (warmup_target / initial_learning_rate)")
            resolve_rollback_max(None, 0.0, names=_NAMES)
        anchors = self._explicit_anchors(var_list, paradigms)
        codes = np.array([4 * l + _PARADIGM_CODE[p] for p, (l, _) in zip(paradigms, numbering)], dtype="int32")
        restoring = self._runtime.deferred_state
        if restoring is not None:
            self._check_deferred_state(restoring, var_list, paradigms, numbering, codes)
            self._runtime.deferred_state = None
            self._restore_existing(restoring)
        self._runtime.restoring = restoring
        try:
            self._create_variables(var_list, paradigms, numbering, hps, anchors, codes, restored=restoring is not None)
        finally:
            self._runtime.restoring = None
        self.built = True

    def _create_variables(self, var_list: list[Any], paradigms: list[str], numbering: list[tuple[int, int]],
                          hps: dict[str, HyperParams], anchors: list[Any], codes: np.ndarray, restored: bool) -> None:
        super().build(var_list)  # EMA averages, gradient accumulators, variable indices
        self._step_count = self.add_variable((), initializer="zeros", dtype="int", name="step")
        self._skipped = self.add_variable((), initializer="zeros", dtype="int", name="skipped")
        self._layout = self.add_variable((len(var_list),), initializer=_constant(codes), dtype="int32",
                                         name="layout")
        dts = [compute_dtype(keras.backend.standardize_dtype(v.dtype), KERAS_XP) for v in var_list]
        roles = ("m", "v") if self.direction == "adam" else ("momentum",)
        slots = [tuple(self._slot(v, role, dt) for role in roles) for v, dt in zip(var_list, dts)]
        facts = []
        pending = []
        for i, (v, dt, p, (l, n)) in enumerate(zip(var_list, dts, paradigms, numbering)):
            anchor = None
            if p == "finetune":
                if anchors[i] is None and not restored and _initialized_in_this_trace(v):
                    # A model built lazily on TensorFlow (no keras.Input) creates its variables in
                    # the same trace as this build; they get their values when the traced step
                    # first runs, so there is nothing to copy yet (reading gives shape (0,)), and
                    # an initializer reading them cannot be lifted out of an XLA step. The anchor
                    # is taken from them at the first apply instead (_take_pending_anchors).
                    anchor = self._slot(v, "anchor", dt)
                    pending.append(i)
                else:
                    source = anchors[i] if anchors[i] is not None else v
                    anchor = self._slot(v, "anchor", dt, initializer=_anchor_initializer(source, dt))
            facts.append(_VariableFacts(variable_path(v), p, l, float(pull_rate(p, l, n, hps[p])), hps[p], dt,
                                        slots[i], anchor))
        self._facts = facts
        self._pending_anchors = tuple(pending)

    def add_variable(self, shape: Any, initializer: Any = "zeros", dtype: Any = None, aggregation: str = "none",
                     layout: Any = None, name: str | None = None) -> Any:
        """Keras's ``add_variable``; while build() restores a deferred state, the value comes from it."""
        restoring = self._runtime.restoring
        if restoring is not None:
            # An initializer, not an assign: on TensorFlow build() runs while the step is traced.
            initializer = _constant(restoring[len(self._variables)])
        return super().add_variable(shape, initializer=initializer, dtype=dtype, aggregation=aggregation,
                                    layout=layout, name=name)

    def _layout_positions(self, var_list: list[Any], paradigms: list[str]) -> tuple[list[tuple], int]:
        """The shape of every optimizer variable build() creates, in order, and the position of ``layout``."""
        shapes = [tuple(v.shape) for v in self.variables]  # iterations, learning_rate (created in __init__)
        own = [tuple(v.shape) for v in var_list]
        shapes += own * (bool(self.use_ema) + bool(self.gradient_accumulation_steps))
        layout = len(shapes) + 2
        shapes += [(), (), (len(var_list),)]
        shapes += [s for s in own for _ in range(2 if self.direction == "adam" else 1)]
        shapes += [s for s, p in zip(own, paradigms) if p == "finetune"]
        return shapes, layout

    def _check_deferred_state(self, state: list[np.ndarray], var_list: list[Any], paradigms: list[str],
                              numbering: list[tuple[int, int]], codes: np.ndarray) -> None:
        shapes, position = self._layout_positions(var_list, paradigms)
        paths = [variable_path(v) for v in var_list]
        how = ("; load_weights() gave this DualOpt that state before it was built. To resume, build it with the "
               "same model and settings; to start a new run from the loaded weights (anchors taken from them), "
               "load the weights before compile()")
        _check_layout([np.shape(a) for a in state], lambda i: state[i], shapes, position, codes, paths, paradigms,
                      [l for l, _ in numbering], how)

    def _restore_existing(self, state: list[np.ndarray]) -> None:
        """Assign the deferred values of the variables that exist before build (iterations, learning_rate)."""
        with _eager():  # once: build may run while the train step is traced
            for v, a in zip(self.variables, state):
                v.assign(a)

    def _slot(self, variable: Any, role: str, dtype: str, initializer: Any = "zeros") -> Any:
        if dtype == keras.backend.standardize_dtype(variable.dtype):
            return self.add_variable_from_reference(variable, name=role, initializer=initializer)
        return self.add_variable(tuple(variable.shape), initializer=initializer, dtype=dtype,
                                 name=f"{variable_path(variable).replace('/', '_')}_{role}")

    def _explicit_anchors(self, var_list: list[Any], paradigms: list[str]) -> list[Any]:
        given = self._anchor_values
        if given is None:
            return [None] * len(var_list)
        if isinstance(given, Mapping):
            paths = [variable_path(v) for v in var_list]
            unknown = sorted(set(given) - set(paths))
            if unknown:
                raise invalid("anchor", f"<mapping with key {unknown[0]!r}>", f"keys among the variable paths {paths}")
            out = [given.get(p) for p in paths]
        else:
            out = list(given)
            if len(out) != len(var_list):
                raise invalid("anchor", f"<{len(out)} arrays>", f"one entry per variable ({len(var_list)}, "
                              "var_list order; None for non-finetune variables)")
        for v, a, p in zip(var_list, out, paradigms):
            if a is None:
                continue
            # Shape and dtype in the core's words (a dtype-less list is converted as given).
            own = keras.backend.standardize_dtype(v.dtype)
            given = getattr(a, "dtype", None)
            check_anchor(f"anchor[{variable_path(v)!r}]", tuple(np.shape(a)),
                         own if given is None else keras.backend.standardize_dtype(given), tuple(v.shape), own)
        return [a if p == "finetune" else None for a, p in zip(out, paradigms)]

    # ------------------------------------------------------------------ update
    def _apply_weight_decay(self, variables: Any) -> None:
        # DualOpt's decay is the scratch pull inside update_step; Keras's must never run.
        return None

    def exclude_from_weight_decay(self, var_list: Any = None, var_names: Any = None) -> None:
        raise invalid("exclude_from_weight_decay", var_names if var_names is not None else var_list,
                      "no call: DualOpt's decay is the scratch paradigm's pull; give excluded variables "
                      "paradigm 'none', e.g. DualOpt(paradigm={'bias': 'none'})")

    def _backend_update_step(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            # Embedding layers give tf.IndexedSlices. The rule is dense (every row's moments
            # decay, every row is pulled), as for any other gradient, so densify once here, after
            # Keras's clipping (which handles IndexedSlices) and before the non-finite check.
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False:
                self._distributed_update(grads, trainable_variables, learning_rate)
                return
        if backend == "torch":
            import torch

            with torch.no_grad():
                self._torch_update(grads, trainable_variables, learning_rate)
            return
        finite = self._all_finite(grads)
        base_update = super()._backend_update_step
        if finite is None:
            base_update(grads, trainable_variables, learning_rate)
        elif backend == "jax":
            self._jax_cond_update(finite, lambda: base_update(grads, trainable_variables, learning_rate),
                                  trainable_variables)
        else:
            ops.cond(finite, lambda: base_update(grads, trainable_variables, learning_rate), lambda: None)
        self._advance_counters(finite)

    def _all_finite(self, grads: Sequence[Any]) -> Any:
        """The skip decision: :func:`_all_finite`, or None under ``nonfinite="propagate"``."""
        return _all_finite(grads) if self.nonfinite == "skip" else None

    def _torch_update(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        """The torch backend's update: a host-side skip decision, then the multi-tensor path.

        Variables whose compute dtype is not their own (float16/bfloat16, computed in float32)
        and every variable with ``_use_fast_path = False`` take Keras's per-variable loop.
        """
        from . import _torch

        grads = [ops.convert_to_tensor(g) for g in grads]
        finite = self._all_finite(grads)
        if finite is None or finite:
            entries, generic = [], []
            for g, v in zip(grads, trainable_variables):
                f = self._facts[self._get_variable_index(v)]
                if not self._use_fast_path or f.compute_dtype != keras.backend.standardize_dtype(v.dtype):
                    generic.append((g, v))
                    continue
                entries.append(_torch.Entry(v.value, g.to(v.value.dtype), tuple(s.value for s in f.slots),
                                            None if f.anchor is None else f.anchor.value, f.hp, f.rate))
            if entries:
                lr = learning_rate.value if isinstance(learning_rate, keras.Variable) else learning_rate
                _torch.update(entries, lr, ops.add(ops.convert_to_tensor(self._step_count), 1), self._fast_path_policy)
            for g, v in generic:
                self.update_step(g, v, learning_rate)
        self._advance_counters(finite)

    def _distributed_update(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        """The update under a ``tf.distribute`` strategy, called in a replica context.

        Keras's TensorFlow optimizer all-reduces the gradients and then enters
        ``merge_call`` to update every mirrored variable; ``merge_call`` must
        not run inside a ``cond``, so the non-finite check cannot wrap the
        whole update as it does without a strategy. The check is taken here on
        the all-reduced gradients (a NaN on one replica reaches all of them),
        and each variable's own update runs under that ``cond`` inside
        ``extended.update``, where no replica synchronises.
        """
        import tensorflow as tf

        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        pairs = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        finite = self._all_finite([g for g, _ in pairs])
        # The flag travels as an argument: merge_call and extended.update regroup it per replica.
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_apply, self._distribution_strategy, pairs, learning_rate,
            ops.convert_to_tensor(True) if finite is None else finite)
        self._advance_counters(finite)

    def _distributed_apply(self, distribution: Any, pairs: list[tuple[Any, Any]], learning_rate: Any,
                           finite: Any) -> None:
        check = self.nonfinite == "skip"

        def apply(variable: Any, gradient: Any, lr: Any, ok: Any) -> None:
            if check:
                ops.cond(ok, lambda: self.update_step(gradient, variable, lr), lambda: None)
            else:
                self.update_step(gradient, variable, lr)

        for gradient, variable in pairs:
            distribution.extended.update(variable, apply, args=(gradient, learning_rate, finite), group=False)

    def _jax_cond_update(self, finite: Any, update: Callable[[], None], trainable_variables: list[Any]) -> None:
        """``update()`` under ``jax.lax.cond(finite, ...)``, written functionally.

        Inside a jitted (stateless) step a branch cannot assign, so the update
        runs in a nested ``keras.StatelessScope`` and the branch returns the new
        values, as Keras's LossScaleOptimizer does. A conditional rather than a
        select of new against old values: with selects XLA recomputed the
        moments inside every parameter's fusion and read every tensor twice
        (benchmarks/README.md, "Keras: figures moved out of docstrings").
        """
        import jax

        if not isinstance(finite, jax.core.Tracer):  # eager apply: decide on the host, ops run one by one
            if bool(finite):
                update()
            return
        touched = list(trainable_variables) + [slot for f in self._facts for slot in f.slots]
        current = [v.value for v in touched]
        # Everything the update reads (anchors too) must be visible in the nested scope.
        ids = {id(v) for v in touched}
        read = [v for v in self.variables if id(v) not in ids]
        mapping = list(zip(touched, current)) + [(v, v.value) for v in read]

        def applied() -> list[Any]:
            with keras.StatelessScope(state_mapping=mapping) as scope:
                update()
            new = [scope.get_current_value(v) for v in touched]
            return [c if n is None else n for n, c in zip(new, current)]

        for variable, value in zip(touched, jax.lax.cond(finite, applied, lambda: current)):
            self.assign(variable, value)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One variable's step: :func:`decoupled_core.step_tensor` on ``keras.ops``.

        ``learning_rate`` is the one Keras's ``apply`` passes; t counts this step
        (``apply`` advances the shared step count after every variable's update).
        """
        f = self._facts[self._get_variable_index(variable)]
        # A number (a callable learning rate's value) is read in the compute dtype: a cast would pass it
        # through float32 on TensorFlow.
        lr = (ops.cast(learning_rate, f.compute_dtype) if hasattr(learning_rate, "dtype")
              else ops.convert_to_tensor(learning_rate, dtype=f.compute_dtype))
        t = ops.cast(ops.add(ops.convert_to_tensor(self._step_count), 1), f.compute_dtype)
        param = ops.convert_to_tensor(variable)
        values = tuple(ops.convert_to_tensor(s) for s in f.slots)
        state = AdamState(*values) if self.direction == "adam" else SGDState(*values)
        anchor = None if f.anchor is None else ops.convert_to_tensor(f.anchor)
        new_param, new_state = step_tensor(param, gradient, state, anchor, hp=f.hp, lr=lr, step=t, rate=f.rate,
                                           xp=KERAS_XP)
        self.assign(variable, new_param)
        for slot, value in zip(f.slots, new_state):
            self.assign(slot, value)

    def _advance_counters(self, finite: Any) -> None:
        """t += 1 after an applied call; ``skipped`` += 1 after a skipped one (``finite`` false)."""
        step = ops.convert_to_tensor(self._step_count)
        if finite is None:
            self.assign(self._step_count, ops.add(step, 1))
            return
        self.assign(self._step_count, ops.where(finite, ops.add(step, 1), step))
        skipped = ops.convert_to_tensor(self._skipped)
        self.assign(self._skipped, ops.add(skipped, ops.cast(ops.logical_not(finite), skipped.dtype)))

    # EMA: Keras updates the averages after every apply; a skipped apply must leave them alone too.
    # Keras starts an average (zeros at build) with momentum 0 when iterations == 0; after skipped
    # applies that first update comes later, so "first" is "no apply accepted yet"
    # (iterations - skipped == 0): else a skipped first batch would leave 0.9 * zeros in the average.
    def _backend_apply_gradients(self, grads: Any, trainable_variables: Any) -> None:
        _refuse_duplicates(self, trainable_variables)
        if self._pending_anchors:
            self._take_pending_anchors()
        if self.use_ema and self.nonfinite == "skip":
            self._runtime.skips_before = ops.copy(ops.convert_to_tensor(self._skipped))
        try:
            super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self._runtime.skips_before = None

    def _take_pending_anchors(self) -> None:
        """Copy lazily created variables into their anchors while ``iterations == 0`` (build).

        Before the first apply no update has touched a variable (an update
        needs an apply; gradient accumulation and skipped calls change no
        weight either), so the copy is the value the variable had at build.
        Later calls keep the anchor: a select, run only for these anchors.
        """
        first = ops.equal(ops.convert_to_tensor(self.iterations), 0)
        for i in self._pending_anchors:
            anchor = self._facts[i].anchor
            source = init_anchor(ops.convert_to_tensor(self._trainable_variables[i]), xp=KERAS_XP)
            self.assign(anchor, ops.where(first, source, ops.convert_to_tensor(anchor)))

    def _update_model_variables_moving_average(self, trainable_variables: Any) -> None:
        before = self._runtime.skips_before
        if before is None:
            return super()._update_model_variables_moving_average(trainable_variables)
        averages = self._model_variables_moving_average
        old = [None if a is None else ops.copy(ops.convert_to_tensor(a)) for a in averages]
        super()._update_model_variables_moving_average(trainable_variables)
        applied = ops.equal(ops.convert_to_tensor(self._skipped), before)
        first = ops.equal(ops.subtract(ops.cast(ops.convert_to_tensor(self.iterations), before.dtype), before), 0)
        for average, previous, var in zip(averages, old, trainable_variables):
            if average is not None:
                value = ops.where(first, ops.convert_to_tensor(var), ops.convert_to_tensor(average))
                self.assign(average, ops.where(applied, value, previous))

    # ------------------------------------------------------------------ state
    @property
    def step_count(self) -> Any:
        """t: the number of applied (not skipped) updates; 0 before the optimizer is built."""
        return self._step_count if self.built else 0

    @property
    def skipped(self) -> Any:
        """How many apply calls the non-finite policy skipped."""
        return self._skipped if self.built else 0

    def anchors(self) -> dict[str, Any]:
        """The finetune anchors, keyed by variable path (empty before build)."""
        return {f.path: f.anchor for f in self._facts if f.anchor is not None}

    def load_own_variables(self, store: Any) -> None:
        """Restore by position (module docstring), refusing a state of another layout.

        Before build (``compile`` -> ``load_weights`` -> ``fit``, where Keras's
        own optimizers drop the state with a warning), the state is kept and
        build() restores it (step, moments, anchors, iterations), after
        checking it against its layout.
        """
        count = len(store.keys())
        if not self.built:
            if count == len(self.variables):  # a state saved before build: iterations (and learning_rate)
                return super().load_own_variables(store)
            self._runtime.deferred_state = [np.array(store[str(i)]) for i in range(count)]
            return
        variables = self.variables
        paths = [f.path for f in self._facts]
        position = next(i for i, v in enumerate(variables) if v is self._layout)
        _check_layout([np.shape(store[str(i)]) for i in range(count)], lambda i: np.asarray(store[str(i)]),
                      [tuple(v.shape) for v in variables], position, ops.convert_to_numpy(self._layout), paths,
                      [f.paradigm for f in self._facts], [f.layer for f in self._facts], "",
                      names=[v.path for v in variables])
        super().load_own_variables(store)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({key: getattr(self, key) for key in _CONFIG_KEYS})
        config.update(paradigm=_serialize_spec(self.paradigm), layer_index=_serialize_spec(self.layer_index))
        return config

    def layer_rates(self) -> dict[str, float]:
        """The pull rate rho of every variable, by variable path (``{"dense/kernel": rate}``), after build.

        The same form as :meth:`dualopt.torch.DualOpt.layer_rates` and
        :func:`dualopt.optax.layer_rates`; the pull coefficient of a step is
        ``min(learning_rate * rho, 1)``. Build first (``opt.build(model.trainable_variables)``,
        or one training step): the numbering needs the variables.

        Examples
        --------
        >>> import numpy as np, keras
        >>> w, b = keras.Variable(np.ones((2, 2)), name="kernel"), keras.Variable(np.zeros(2), name="bias")
        >>> opt = DualOpt(learning_rate=1e-3, paradigm="finetune", rollback_max=10.0)
        >>> opt.build([w, b])
        >>> opt.layer_rates()
        {'kernel': 10.0, 'bias': 0.0}
        """
        if not self.built:
            raise ValueError("layer_rates() needs the variables: call opt.build(model.trainable_variables) first "
                             "(model.compile does not build the optimizer; fit or one train step does)")
        return {f.path: f.rate for f in self._facts}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "DualOpt":
        config = dict(config)
        for key in ("paradigm", "layer_index"):
            if key in config:
                config[key] = _deserialize_spec(config[key])
        return super().from_config(config, custom_objects=custom_objects)


@contextlib.contextmanager
def _float64_learning_rate(schedule: bool) -> Iterator[None]:
    """Make the base class create a float learning rate's variable in float64 (the spec's eta).

    Keras creates it in ``floatx()``, and a float64 model would step with eta
    rounded to float32; each step casts it to the compute dtype. Replacing the
    variable after ``__init__`` mutated Keras's variable list in place, which
    ``tf.train.Checkpoint`` refuses to save. jax without x64 keeps floatx.
    """
    previous = keras.config.floatx()
    if schedule or previous == "float64":
        yield
        return
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.read("jax_enable_x64"):
            yield
            return
    keras.config.set_floatx("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def _all_finite(grads: Sequence[Any]) -> Any:
    """Every gradient element is finite: one check per framework.

    jax, inside a trace: the jax adapters' exact check (:mod:`dualopt._shared.jax`), which
    reads each gradient once where XLA:CPU compiles the core's ``all(isfinite(g))`` into a
    boolean array per gradient. torch: torch's (:mod:`dualopt._shared.torch_lists`), a host
    bool (torch runs eagerly). Otherwise the core's ``all_finite`` on ``keras.ops``.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if any(isinstance(g, jax.core.Tracer) for g in grads):
            from .._shared.jax import all_finite as jax_all_finite

            return jax_all_finite(grads)
    if backend == "torch":
        from .._shared.torch_lists import grads_finite

        return grads_finite(grads)
    return all_finite(grads, xp=KERAS_XP)


def _refuse_duplicates(opt: "DualOpt", variables: Sequence[Any]) -> None:
    """Refuse a variable listed twice: it would be stepped twice per call with one set of slots.

    Keras's own optimizers (Adam, SGD in 3.15) accept it silently and do exactly that.
    """
    seen: dict[Any, int] = {}
    for i, v in enumerate(variables):
        j = seen.setdefault(opt._var_key(v), i)
        if j != i:
            raise invalid("var_list", f"<{len(variables)} variables>", f"each variable once; "
                          f"{variable_path(v)!r} is at positions {j} and {i}")


def _check_layout(saved_shapes: list[tuple], saved: Callable[[int], np.ndarray], shapes: list[tuple], position: int,
                  codes: np.ndarray, paths: list[str], paradigms: list[str], layers: list[int], how: str,
                  names: list[str] | None = None) -> None:
    """Refuse a saved optimizer state whose count, layout entry or shapes differ from this DualOpt's."""
    if len(saved_shapes) != len(shapes):
        raise invalid("optimizer state", f"<{len(saved_shapes)} variables>",
                      f"the {len(shapes)} variables of this DualOpt's layout (same model, paradigms, "
                      f"direction, use_ema and gradient_accumulation_steps){how}")
    layout = np.asarray(saved(position))
    if layout.shape != codes.shape or not np.array_equal(layout, codes):
        i = int(np.argmax(layout != codes)) if layout.shape == codes.shape else 0
        raise invalid(f"optimizer state for {paths[i]!r}", _describe_code(layout.reshape(-1)[i]) if layout.size else
                      "<empty>", f"{paradigms[i]} layer {layers[i]} as in this DualOpt{how}")
    for i, (got, want) in enumerate(zip(saved_shapes, shapes)):
        if tuple(got) != tuple(want):
            entry = f"optimizer state entry {i}" + (f" ({names[i]})" if names else "")
            raise invalid(entry, f"<array of shape {tuple(got)}>", f"shape {tuple(want)}{how}")
    scalars = [i for i, got in enumerate(saved_shapes) if tuple(got) == ()]  # the counters
    check_saved_counts([np.asarray(saved(i)) for i in scalars], [names[i] if names else str(i) for i in scalars],
                       positions=scalars)


def _describe_code(code: Any) -> str:
    code = int(code)
    names = {v: k for k, v in _PARADIGM_CODE.items()}
    return f"<{names.get(code % 4, '?')} layer {code // 4}>"


def _constant(values: np.ndarray) -> Callable[..., Any]:
    def initializer(shape: Any, dtype: Any = None) -> Any:
        return ops.convert_to_tensor(values, dtype=dtype)

    return initializer


def _initialized_in_this_trace(variable: Any) -> bool:
    """True for a TensorFlow variable created in the ``tf.function`` being traced and not yet initialised."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    value = variable.value if isinstance(variable, keras.Variable) else variable
    if not isinstance(value, tf.Variable) or tf.executing_eagerly():
        return False
    with tf.init_scope():
        return not bool(value.is_initialized())


def _anchor_initializer(source: Any, dtype: str) -> Callable[..., Any]:
    """An initializer returning the core's anchor snapshot (:func:`decoupled_core.init_anchor`) of ``source``.

    ``source`` is the variable or an explicit anchor (a dtype-less one is read
    in the compute ``dtype``). Keras forces an initializer rather than an
    assign in build: on TensorFlow build runs while the train step is traced,
    where an assign would run on every step. The snapshot is taken once,
    eagerly (``tf.init_scope``), because an initializer that reads another
    variable cannot be lifted out of an XLA-compiled step (``jit_compile=True``).
    """
    with _eager():
        snapshot = init_anchor(ops.convert_to_tensor(source, dtype=None if hasattr(source, "dtype") else dtype),
                               xp=KERAS_XP)
    return _constant(snapshot)


def _eager() -> Any:
    """``tf.init_scope()`` on TensorFlow (run eagerly, outside the step being traced); else nothing."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.init_scope()
