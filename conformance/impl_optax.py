"""Optax implementations for the conformance suite.

- ``optax dualopt (jit)``: :func:`dualopt.optax.dualopt` in the ordinary Optax loop
  (``tx.update`` + ``optax.apply_updates``) compiled with ``jax.jit``.
- ``optax dualopt (eager)``: the same loop without ``jax.jit``.
- ``optax dualopt step() (jit)``: :func:`dualopt.optax.step` (the new params
  themselves, no ``params + (new - params)`` round trip) under ``jax.jit``:
  the other public entry point, which the loop rows do not call.
- ``optax.adam``: Optax's own Adam, closed loop in mode ``"none"`` only (the
  degenerate comparison).

Everything runs with ``jax.enable_x64(True)`` scoped to the call, so float64
cases stay float64 and nothing leaks into the caller's JAX configuration.
Cases with the ``missing_grads`` feature are not supported: an Optax update
receives a gradient pytree with the params' structure, so a single tensor
cannot lack a gradient (a zero gradient is still a step: moments decay, the
pull acts, and the shared count advances).

Examples
--------
>>> from dualopt.spec.vectors import load_case
>>> from dualopt.spec import VECTORS_DIR
>>> impl = OptaxDualOpt(jit=True)
>>> case = load_case(VECTORS_DIR / "adam_finetune_p1.float64.json")
>>> traj = impl.replay_cases([case])["adam_finetune_p1.float64"]
>>> float(abs(traj[-1]["w0"] - case.expected[-1]["w0"]).max()) < 1e-15
True
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from decoupled_core import HyperParams
from dualopt.spec.vectors import Case

from .problem import LAYER_INDEX, NAMES, Problem, group_hyperparams
from .protocol import Implementation, Trajectory, case_id

__all__ = ["OptaxDualOpt", "OptaxStep", "OptaxAdam", "implementations", "dualopt_kwargs", "case_transform",
           "replay_case", "train_closed_loop"]

# HyperParams field -> dualopt.optax argument
_ARG = {"direction": "direction", "beta1": "b1", "beta2": "b2", "eps": "eps", "momentum": "momentum",
        "nesterov": "nesterov", "paradigm": "paradigm", "weight_decay": "weight_decay",
        "rollback_max": "rollback_max", "rollback_min": "rollback_min", "rollback_power": "rollback_power"}


def _missing() -> str | None:
    for module in ("jax", "optax"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    return None


def dualopt_kwargs(hps: Mapping[str, HyperParams], nest: Callable[[Mapping[str, Any]], Any]) -> dict[str, Any]:
    """Per-tensor hyperparameters -> ``dualopt`` keyword arguments (one value if all agree, else a pytree).

    ``nest`` turns ``{tensor name: value}`` into a pytree with the params' structure.

    Examples
    --------
    >>> a, b = HyperParams(paradigm="finetune"), HyperParams(paradigm="scratch")
    >>> kw = dualopt_kwargs({"w": a, "h": b}, dict)
    >>> kw["paradigm"], kw["b1"]
    ({'w': 'finetune', 'h': 'scratch'}, 0.9)
    """
    out = {}
    for field, arg in _ARG.items():
        values = {name: getattr(hp, field) for name, hp in hps.items()}
        distinct = {repr(v) for v in values.values()}
        out[arg] = next(iter(values.values())) if len(distinct) == 1 else nest(values)
    return out


def case_transform(case: Case) -> tuple[Any, dict[str, Any]]:
    """``(tx, params)`` for a vector case: a flat ``{tensor name: array}`` pytree.

    The case's tensor order is its layer order, so ``layer_index`` is always
    passed explicitly (dicts flatten in sorted key order). A constant learning
    rate is a Python float; a varying one is a schedule that indexes the case's
    list with the update count.
    """
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    names = case.names
    keys = case.layer_index if case.layer_index is not None else list(range(len(names)))
    kwargs = dualopt_kwargs({n: case.hp(n) for n in names}, dict)
    if len(set(case.lr)) == 1:
        lr: Any = float(case.lr[0])
    else:
        table = np.asarray(case.lr, dtype=np.float64)
        lr = lambda count: jnp.asarray(table)[count]  # noqa: E731
    tx = dualopt(lr, layer_index=dict(zip(names, keys)), anchor={n: case.anchor.get(n) for n in names},
                 nonfinite=case.nonfinite, **kwargs)
    params = {n: jnp.asarray(case.initial[n]) for n in names}
    return tx, params


def _step_fn(tx: Any, jit: bool, direct: bool = False) -> Callable:
    import jax
    import optax

    from dualopt.optax import step as dualopt_step

    def step(params, state, grads):
        if direct:
            return dualopt_step(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step) if jit else step


def replay_case(case: Case, *, jit: bool, direct: bool = False) -> Trajectory:
    """Replay one case in the ordinary Optax loop (``direct``: with :func:`dualopt.optax.step`); parameters after
    every step (numpy, case dtype)."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        tx, params = case_transform(case)
        state = tx.init(params)
        step = _step_fn(tx, jit, direct)
        out: Trajectory = []
        for grads in case.grads:
            params, state = step(params, state, {n: jnp.asarray(g) for n, g in grads.items()})
            out.append({n: np.asarray(p).copy() for n, p in params.items()})
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"dense_0/kernel": v}`` -> ``{"dense_0": {"kernel": v}}`` (the Flax-like params layout)."""
    out: dict[str, dict[str, Any]] = {}
    for name, v in flat.items():
        layer, leaf = name.split("/")
        out.setdefault(layer, {})[leaf] = v
    return out


def _loss(params: Any, x: Any, y: Any) -> Any:
    import jax.numpy as jnp
    import optax

    h = x
    for i in range(3):
        h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < 2:
            h = jnp.tanh(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def train_closed_loop(problem: Problem, tx_for_mode: Callable[[str], Any], mode: str, *,
                      direct: bool = False) -> Trajectory:
    """Train the problem's MLP with ``jax.grad`` + ``tx.update`` + ``optax.apply_updates`` (jitted step), float64;
    ``direct``: with :func:`dualopt.optax.step` instead of the update and its round trip."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import step as dualopt_step

    with jax.enable_x64(True):
        tx = tx_for_mode(mode)
        params = _nest({n: jnp.asarray(problem.weights[n], jnp.float64) for n in NAMES})
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y):
            grads = jax.grad(_loss)(params, x, y)
            if direct:
                return dualopt_step(tx, grads, state, params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        out: Trajectory = []
        for _ in range(problem.epochs):
            for x, y in problem.batches():
                params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
            out.append({n: np.asarray(params[n.split("/")[0]][n.split("/")[1]]).copy() for n in NAMES})
    return out


def _dualopt_for_problem(problem: Problem) -> Callable[[str], Any]:
    def make(mode: str) -> Any:
        from dualopt.optax import dualopt

        hps = group_hyperparams(mode)
        return dualopt(problem.lr, layer_index=_nest(dict(zip(NAMES, LAYER_INDEX))), **dualopt_kwargs(hps, _nest))

    return make


@dataclasses.dataclass
class OptaxDualOpt:
    """:func:`dualopt.optax.dualopt` in the ordinary Optax loop, with or without ``jax.jit``."""

    jit: bool = True

    def __post_init__(self) -> None:
        self.name = "optax dualopt (jit)" if self.jit else "optax dualopt (eager)"
        self.framework = "optax"
        # Tolerance class (conformance/tolerances.py): XLA fuses under jit, and in both modes the
        # update is returned as new - params and re-added by optax.apply_updates, which may
        # round differently from new when |new - params| is not small against |params|.
        self.numerics = "xla-jit"

    def unavailable(self) -> str | None:
        return _missing()

    def supports(self, case: Case) -> bool:
        return "missing_grads" not in case.features

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return {case_id(c): replay_case(c, jit=self.jit) for c in cases if self.supports(c)}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        if not self.jit:
            raise NotImplementedError(f"{self.name} has no closed loop (the jitted variant has one)")
        make = _dualopt_for_problem(problem)
        return {mode: train_closed_loop(problem, make, mode) for mode in modes}


class OptaxStep:
    """:func:`dualopt.optax.step` under ``jax.jit``: the new params without the updates' round trip."""

    name = "optax dualopt step() (jit)"
    framework = "optax"
    numerics = "xla-jit"  # XLA fuses under jit; bias corrections computed on the device

    def unavailable(self) -> str | None:
        return _missing()

    def supports(self, case: Case) -> bool:
        return "missing_grads" not in case.features

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return {case_id(c): replay_case(c, jit=True, direct=True) for c in cases if self.supports(c)}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        make = _dualopt_for_problem(problem)
        return {mode: train_closed_loop(problem, make, mode, direct=True) for mode in modes}


@dataclasses.dataclass
class OptaxAdam:
    """``optax.adam`` (same betas and eps): the native optimizer for the degenerate ``"none"`` mode."""

    name: str = "optax.adam"
    framework: str = "optax"
    numerics: str = "native"

    def unavailable(self) -> str | None:
        return _missing()

    def supports(self, case: Case) -> bool:
        return False

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return {}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        bad = [m for m in modes if m != "none"]
        if bad:
            raise NotImplementedError(f"{self.name} trains mode 'none' only, not {bad}")

        def make(mode: str) -> Any:
            import optax

            hp = group_hyperparams("none")[NAMES[0]]
            return optax.adam(problem.lr, b1=hp.beta1, b2=hp.beta2, eps=hp.eps)

        return {"none": train_closed_loop(problem, make, "none")}


def implementations() -> list[Implementation]:
    """The Optax implementations; each reports itself unavailable when jax or optax is missing."""
    return [OptaxDualOpt(jit=True), OptaxDualOpt(jit=False), OptaxStep(), OptaxAdam()]
