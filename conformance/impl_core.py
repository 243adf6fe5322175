"""The core itself, run on every Array API namespace it supports: the suite's own implementations.

``core[numpy]``, ``core[array-api-strict]``, ``core[torch]`` and ``core[jax]``
replay the vectors with :class:`decoupled_core.ReferenceOptimizer` on that
namespace's arrays; ``core[jax, jit]`` compiles :func:`decoupled_core.step_tensor`
with ``jax.jit`` (float64 enabled) and passes the learning rate, step count and
pull rate as traced scalars, so the bias corrections are computed on the
device. ``core[numpy]`` also trains the closed-loop problem with the hand-written
backprop of :func:`dualopt.conformance.problem.loss_and_grads_numpy`: it is the
closed-loop reference every framework is compared with.

Examples
--------
>>> from dualopt.spec.vectors import load_case
>>> from dualopt.spec import VECTORS_DIR
>>> impl = CoreImplementation("numpy")
>>> case = load_case(VECTORS_DIR / "adam_scratch.float64.json")
>>> traj = impl.replay_cases([case])["adam_scratch.float64"]
>>> bool((traj[-1]["w0"] == case.expected[-1]["w0"]).all())
True
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Callable, Sequence

import numpy as np

from decoupled_core import ReferenceOptimizer, all_finite, init_anchor, init_direction_state, layer_rates, step_tensor
from dualopt.spec.vectors import Case

from .problem import LAYER_INDEX, NAMES, Problem, group_hyperparams, loss_and_grads_numpy
from .protocol import Implementation, Trajectory, case_id

__all__ = ["CoreImplementation", "implementations", "replay_reference", "train_reference"]

# namespace key -> (module that must be importable, display name)
_NAMESPACES = {
    "numpy": ("numpy", "numpy"),
    "array_api_strict": ("array_api_strict", "array-api-strict"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
}


def _namespace(key: str) -> tuple[Any, Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """``(xp, to_xp, to_numpy)`` for a namespace key; imports the framework on first use."""
    if key == "numpy":
        return np, lambda a: np.array(a, copy=True), lambda a: np.array(a, copy=True)
    if key == "array_api_strict":
        import array_api_strict as xs

        return xs, xs.asarray, lambda a: np.from_dlpack(a).copy()
    if key == "torch":
        import array_api_compat.torch as xt
        import torch

        return xt, lambda a: torch.from_numpy(np.array(a, copy=True)), lambda a: a.detach().numpy().copy()
    if key == "jax":
        import jax.numpy as jnp

        return jnp, jnp.asarray, lambda a: np.asarray(a).copy()
    raise ValueError(f"namespace={key!r} is invalid: expected one of {tuple(_NAMESPACES)}.")


def _x64(namespace: str) -> Any:
    """jax needs 64-bit mode for float64 vectors (else it silently makes float32 arrays).

    Scoped to the call, so the caller's jax configuration (another suite in the
    same process) is left alone.
    """
    if namespace != "jax":
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


def replay_reference(case: Case, xp: Any = np, to_xp: Callable = np.asarray,
                     to_numpy: Callable = np.asarray) -> Trajectory:
    """Replay one vector case with :class:`decoupled_core.ReferenceOptimizer` on namespace ``xp``.

    Examples
    --------
    >>> from dualopt.spec.vectors import load_case
    >>> from dualopt.spec import VECTORS_DIR
    >>> case = load_case(VECTORS_DIR / "sgd_scratch.float32.json")
    >>> traj = replay_reference(case)
    >>> len(traj) == case.steps, traj[0]["w0"].dtype
    (True, dtype('float32'))
    """
    names = case.names
    opt = ReferenceOptimizer([to_xp(case.initial[n]) for n in names], [case.hp(n) for n in names],
                             base_lr=case.base_lr, layer_index=case.layer_index,
                             anchors=[to_xp(case.anchor[n]) if n in case.anchor else None for n in names],
                             nonfinite=case.nonfinite, xp=xp)
    out: Trajectory = []
    for grads, lr in zip(case.grads, case.lr):
        opt.step([None if grads[n] is None else to_xp(grads[n]) for n in names], lr)
        out.append({n: to_numpy(p) for n, p in zip(names, opt.params)})
    return out


def _replay_jitted(case: Case) -> Trajectory:
    """Replay one case with ``jax.jit`` around :func:`decoupled_core.step_tensor`.

    One compiled call steps every tensor of the case (one compilation per case
    rather than per tensor); the learning rate, step counts and pull rates are
    traced float64/int64 scalars, so the bias corrections and the pull
    coefficient are computed on the device. The non-finite check runs on the
    host: it decides whether the whole call is applied.
    """
    import jax
    import jax.numpy as jnp

    step_all = _jitted_step()
    names = case.names
    hps = tuple(case.hp(n) for n in names)
    rates = [jnp.asarray(r, jnp.float64) for r in layer_rates(hps, case.layer_index)]
    params = [jnp.asarray(case.initial[n]) for n in names]
    # Initial state built on the host (numpy) and transferred: eager jax would compile
    # a zeros/copy kernel per shape, which costs more than the whole replay.
    states = [jax.tree.map(jnp.asarray, init_direction_state(case.initial[n], hp.direction, xp=np))
              for n, hp in zip(names, hps)]
    anchors = [jnp.asarray(init_anchor(case.anchor[n], xp=np)) if hp.paradigm == "finetune" else None
               for n, hp in zip(names, hps)]
    counts = [0] * len(names)
    out: Trajectory = []
    for grads, lr in zip(case.grads, case.lr):
        host = [grads[n] for n in names]
        if case.nonfinite != "skip" or bool(all_finite(host, xp=np)):
            gs = [None if g is None else jnp.asarray(g) for g in host]
            counts = [c + (g is not None) for c, g in zip(counts, gs)]
            params, states = step_all(params, gs, states, anchors, jnp.asarray(lr, jnp.float64),
                                      [jnp.asarray(c, jnp.int64) for c in counts], rates, hps=hps)
        out.append({n: np.asarray(p).copy() for n, p in zip(names, params)})
    return out


_JITTED: list[Callable] = []


def _jitted_step() -> Callable:
    """``jax.jit`` of one optimizer call: :func:`decoupled_core.step_tensor` on every tensor that has a gradient."""
    if not _JITTED:
        import jax
        import jax.numpy as jnp

        def step_all(params, grads, states, anchors, lr, counts, rates, *, hps):
            new_params, new_states = list(params), list(states)
            for i, (g, hp) in enumerate(zip(grads, hps)):
                if g is None:  # no gradient: the tensor and its state stay as they are
                    continue
                new_params[i], new_states[i] = step_tensor(params[i], g, states[i], anchors[i], hp=hp, lr=lr,
                                                           step=counts[i], rate=rates[i], xp=jnp)
            return new_params, new_states

        _JITTED.append(jax.jit(step_all, static_argnames=("hps",)))
    return _JITTED[0]


def train_reference(problem: Problem, mode: str) -> Trajectory:
    """The closed-loop reference: the core on numpy, hand-written backprop, weights after every epoch.

    Examples
    --------
    >>> from dualopt.conformance.problem import make_problem
    >>> import dataclasses
    >>> traj = train_reference(dataclasses.replace(make_problem(), epochs=2), "mixed")
    >>> len(traj), traj[-1]["dense_0/kernel"].shape
    (2, (16, 32))
    """
    hps = group_hyperparams(mode)
    opt = ReferenceOptimizer([problem.weights[n].copy() for n in NAMES], [hps[n] for n in NAMES],
                             base_lr=problem.lr, layer_index=LAYER_INDEX, xp=np)
    out: Trajectory = []
    for _ in range(problem.epochs):
        for x, y in problem.batches():
            _, grads = loss_and_grads_numpy(dict(zip(NAMES, opt.params)), x, y)
            opt.step([grads[n] for n in NAMES], problem.lr)
        out.append({n: p.copy() for n, p in zip(NAMES, opt.params)})
    return out


class CoreImplementation:
    """``decoupled_core`` on one Array API namespace (``numpy``, ``array_api_strict``, ``torch``, ``jax``).

    ``jit=True`` (jax only) compiles the per-tensor step. Only ``core[numpy]``
    has a closed loop (it is the closed-loop reference).
    """

    def __init__(self, namespace: str, *, jit: bool = False) -> None:
        if namespace not in _NAMESPACES:
            raise ValueError(f"namespace={namespace!r} is invalid: expected one of {tuple(_NAMESPACES)}.")
        if jit and namespace != "jax":
            raise ValueError(f"jit={jit!r} is invalid: expected False for namespace {namespace!r} (only jax jits).")
        self.namespace = namespace
        self.jit = jit
        display = _NAMESPACES[namespace][1]
        self.framework = f"core[{display}]"
        self.name = f"core[{display}, jit]" if jit else f"core[{display}]"
        # Tolerance class (spec/TOLERANCES.md): torch's CPU sqrt is not correctly
        # rounded; XLA under jit fuses and computes traced bias corrections.
        self.numerics = "torch" if namespace == "torch" else ("xla-jit" if jit else "exact")

    def unavailable(self) -> str | None:
        module = _NAMESPACES[self.namespace][0]
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
        return None

    def supports(self, case: Case) -> bool:
        return True

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        with _x64(self.namespace):
            if self.jit:
                return {case_id(c): _replay_jitted(c) for c in cases}
            xp, to_xp, to_numpy = _namespace(self.namespace)
            return {case_id(c): replay_reference(c, xp, to_xp, to_numpy) for c in cases}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        if self.namespace != "numpy":
            raise NotImplementedError(f"{self.name} has no closed loop (core[numpy] is the closed-loop reference)")
        return {mode: train_reference(problem, mode) for mode in modes}


def implementations() -> list[Implementation]:
    """Every core variant; each reports itself unavailable when its namespace is not installed."""
    return [CoreImplementation("numpy"), CoreImplementation("array_api_strict"), CoreImplementation("torch"),
            CoreImplementation("jax"), CoreImplementation("jax", jit=True)]
