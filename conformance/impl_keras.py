"""Keras 3 implementations for the conformance suite, one per backend.

``keras DualOpt [jax]``, ``[torch]`` and ``[tensorflow]`` run
:class:`dualopt.keras.DualOpt` in a subprocess with ``KERAS_BACKEND`` set
(Keras picks its backend once per process); all cases of one call run in one
subprocess, so each backend's start-up (5-7 s) is paid once.

- Open loop: every tensor is a ``keras.Variable`` of the case's dtype (float64
  runs with ``floatx="float64"`` and, on jax, ``JAX_ENABLE_X64``); each step
  sets ``optimizer.learning_rate`` and calls ``optimizer.apply``.
- Closed loop: ``model.fit(x, y, batch_size=problem.batch_size,
  epochs=problem.epochs, shuffle=False)`` on the problem's MLP in float64 with
  softmax cross-entropy; a callback records the weights after every epoch.
  ``paradigm`` maps each variable path to its group's paradigm and
  ``layer_index`` is :data:`dualopt.conformance.problem.LAYER_INDEX`. The
  layers and the loss are small custom ones (:func:`float64_layers`) on the
  backend's own ops: in Keras 3.15 ``keras.layers.Dense``, ``ops.tanh`` and the
  built-in losses compute in float32 on jax and torch even in a float64 model
  (keras-team/keras#23704, #23223), which moved this comparison by ~3e-7.

Cases a single ``DualOpt`` cannot express are not supported: gradients missing
on some steps only (Keras keeps one shared step count) and groups that differ
in direction or in a hyperparameter other than the paradigm's own rate.

``keras DualOpt [torch] (core on lists)`` is the torch backend with
``dualopt.keras._torch.Policy(fused_adam=False)``: Adam on the core's functions
over lists of tensors instead of torch's fused Adam kernel, so that each
evaluator behind the fast path's delegation point has its own row.

``keras.optimizers.Adam [backend]`` is the native comparison (closed loop,
mode ``none`` only). Keras's Adam adds epsilon to ``sqrt(v)`` before the bias
correction (``epsilon_hat``), so with the same ``epsilon`` it differs from
DualOpt's ``paradigm="none"`` by terms of order epsilon.

Run a worker by hand: ``KERAS_BACKEND=jax python -m dualopt.conformance.impl_keras
replay in.pkl out.pkl``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Sequence

import numpy as np

from decoupled_core import HyperParams
from dualopt.spec.vectors import Case

from .keras_process import keras_setup, run, serve
from .problem import LAYER_INDEX, NAMES, SIZES, Problem, group_hyperparams
from .protocol import Implementation, Trajectory, case_id

__all__ = ["KerasDualOpt", "KerasNativeAdam", "implementations", "optimizer_kwargs", "replay_case", "train_problem",
           "build_problem_model", "float64_layers", "run_worker", "BACKENDS"]

BACKENDS = ("jax", "torch", "tensorflow")
_COMMON = ("direction", "beta1", "beta2", "eps", "momentum", "nesterov")
_KERAS_NAME = {"beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"}


def optimizer_kwargs(hps: dict[str, HyperParams]) -> dict[str, Any] | None:
    """``DualOpt`` keyword arguments reproducing per-tensor groups, or None if one optimizer cannot.

    ``hps`` maps a variable path (or layer name) to its group's hyperparameters.

    Examples
    --------
    >>> ft = HyperParams(paradigm="finetune", rollback_max=5.0)
    >>> kw = optimizer_kwargs({"body": ft, "head": HyperParams(weight_decay=0.5)})
    >>> kw["paradigm"], kw["rollback_max"], kw["weight_decay"]
    ({'body': 'finetune', 'head': 'scratch'}, 5.0, 0.5)
    >>> optimizer_kwargs({"a": HyperParams(), "b": HyperParams(direction="sgd")}) is None
    True
    """
    groups = list(hps.values())
    kwargs: dict[str, Any] = {}
    for field in _COMMON:
        values = {getattr(hp, field) for hp in groups}
        if len(values) != 1:
            return None
        kwargs[_KERAS_NAME.get(field, field)] = values.pop()
    own = {"scratch": ("weight_decay",), "finetune": ("rollback_max", "rollback_min", "rollback_power")}
    for paradigm, fields in own.items():
        for field in fields:
            values = {getattr(hp, field) for hp in groups if hp.paradigm == paradigm}
            if len(values) > 1:
                return None
            if values:
                kwargs[field] = values.pop()
    kwargs["paradigm"] = {name: hp.paradigm for name, hp in hps.items()}
    return kwargs


def _supported(case: Case) -> bool:
    if "missing_grads" in case.features:
        return False
    return optimizer_kwargs({n: case.hp(n) for n in case.names}) is not None


# --------------------------------------------------------------------------- in the worker process
def replay_case(case: Case, *, fast_path: bool = True, policy: Any = None) -> Trajectory:
    """Replay one case through ``DualOpt.apply`` in this process's Keras backend.

    ``policy``: a ``dualopt.keras._torch.Policy`` for the torch backend's fast path (None: its default).
    """
    keras = keras_setup(case.dtype)
    from dualopt.keras import DualOpt

    names = case.names
    variables = [keras.Variable(case.initial[n], dtype=case.dtype, name=n) for n in names]
    kwargs = optimizer_kwargs({n: case.hp(n) for n in names})
    if kwargs is None:
        raise NotImplementedError(f"{case.name}: groups one DualOpt cannot express")
    opt = DualOpt(learning_rate=float(case.base_lr), layer_index=case.layer_index, nonfinite=case.nonfinite,
                  anchor={n: case.anchor[n] for n in names if n in case.anchor}, **kwargs)
    opt._use_fast_path = fast_path
    opt._fast_path_policy = policy
    out: Trajectory = []
    for grads, lr in zip(case.grads, case.lr):
        opt.learning_rate = float(lr)
        opt.apply([grads[n] for n in names], variables)
        out.append({n: np.array(keras.ops.convert_to_numpy(v), dtype=case.dtype) for n, v in zip(names, variables)})
    return out


class _Float64Ops:
    """``matmul``, ``tanh`` and the batch-mean cross-entropy with this process's backend's own ops.

    Keras 3.15's ``keras.ops`` demote float64 to float32 on jax and torch:
    ``keras.backend.result_type("float64", "float64")`` is ``"float32"`` there
    (``BIT64_TO_BIT32_DTYPE`` in ``keras/src/backend/common/dtypes.py``;
    keras-team/keras#23704, #23223), and ops that consult it compute in float32
    even on float64 inputs: ``ops.tanh`` on jax, ``ops.matmul`` on torch,
    ``ops.mean`` on both (so ``keras.layers.Dense`` and the built-in losses'
    ``sum_over_batch_size`` reduction, via ``ops.divide_no_nan`` on torch). The
    closed loop is a float64 comparison, so its layer and loss call jax.numpy,
    torch or tf directly; ``tests/keras`` checks with ``jax.make_jaxpr`` and
    against the hand-written numpy backprop that the whole forward and backward
    pass stays in float64.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        if backend == "jax":
            import jax
            import jax.numpy as jnp

            self.matmul, self.tanh = jnp.matmul, jnp.tanh
            self._log_softmax, self._mean = jax.nn.log_softmax, jnp.mean
            self._pick = lambda logp, y: jnp.take_along_axis(logp, y.astype("int64")[:, None], axis=1)
        elif backend == "torch":
            import torch

            self.matmul, self.tanh = torch.matmul, torch.tanh
            self._log_softmax, self._mean = (lambda z: torch.log_softmax(z, dim=-1)), torch.mean
            self._pick = lambda logp, y: torch.gather(logp, 1, y.long()[:, None])
        elif backend == "tensorflow":
            import tensorflow as tf

            self.matmul, self.tanh = tf.linalg.matmul, tf.math.tanh
            self._log_softmax, self._mean = tf.nn.log_softmax, tf.reduce_mean
            self._pick = lambda logp, y: tf.gather(logp, tf.cast(y, "int64")[:, None], axis=1, batch_dims=1)
        else:
            raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")

    def cross_entropy(self, labels: Any, logits: Any) -> Any:
        """``mean_i -log softmax(logits_i)[labels_i]`` (a scalar: Keras's reduction is left out)."""
        return -self._mean(self._pick(self._log_softmax(logits), labels))


_KERAS_CLASSES: dict[str, Any] = {}


def float64_layers() -> tuple[type, type]:
    """``(Float64Dense, Float64CrossEntropy)``: the closed loop's layer and loss (see :class:`_Float64Ops`).

    ``Float64Dense(units, tanh=...)`` computes ``x @ kernel + bias`` (then
    ``tanh``) and owns variables named ``kernel`` and ``bias`` like
    ``keras.layers.Dense``; ``Float64CrossEntropy`` is softmax cross-entropy
    from logits, averaged over the batch. Defined on first use, so importing
    this module imports no framework.
    """
    if not _KERAS_CLASSES:
        import keras

        ops_ = _Float64Ops(keras.backend.backend())

        class Float64Dense(keras.layers.Layer):
            def __init__(self, units: int, tanh: bool = False, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.units, self.use_tanh = units, tanh

            def build(self, input_shape: Any) -> None:
                self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="zeros",
                                              name="kernel")
                self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

            def call(self, x: Any) -> Any:
                z = ops_.matmul(x, self.kernel.value) + self.bias.value
                return ops_.tanh(z) if self.use_tanh else z

            def compute_output_shape(self, input_shape: Any) -> tuple:
                return (*input_shape[:-1], self.units)

        class Float64CrossEntropy(keras.losses.Loss):
            def call(self, y_true: Any, y_pred: Any) -> Any:
                return ops_.cross_entropy(y_true, y_pred)

        _KERAS_CLASSES.update(dense=Float64Dense, loss=Float64CrossEntropy)
    return _KERAS_CLASSES["dense"], _KERAS_CLASSES["loss"]


def build_problem_model(problem: Problem) -> Any:
    """The problem's 16-32-32-4 tanh MLP as a float64 Keras model holding ``problem.weights``.

    Its layers are :func:`float64_layers`'s ``Float64Dense``, not
    ``keras.layers.Dense`` (which computes in float32 on jax and torch in
    Keras 3.15, see :class:`_Float64Ops`).
    """
    keras = keras_setup("float64")
    dense, _ = float64_layers()
    inputs = keras.Input((SIZES[0],), dtype="float64")
    h = inputs
    for i, width in enumerate(SIZES[1:]):
        h = dense(width, tanh=i < len(SIZES) - 2, dtype="float64", name=f"dense_{i}")(h)
    model = keras.Model(inputs, h)
    for v in model.trainable_variables:
        v.assign(problem.weights[v.path])
    return model


def _weights(model: Any) -> dict[str, np.ndarray]:
    import keras

    return {v.path: np.array(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in model.trainable_variables}


def train_problem(problem: Problem, optimizer: Any) -> Trajectory:
    """``model.fit`` the problem with ``optimizer``; the weights after every epoch."""
    keras = keras_setup("float64")
    model = build_problem_model(problem)
    if [v.path for v in model.trainable_variables] != list(NAMES):
        raise RuntimeError(f"unexpected variable order {[v.path for v in model.trainable_variables]}")
    _, loss = float64_layers()
    model.compile(optimizer=optimizer, loss=loss())
    out: Trajectory = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: out.append(_weights(model)))
    model.fit(problem.x, problem.y, batch_size=problem.batch_size, epochs=problem.epochs, shuffle=False,
              verbose=0, callbacks=[record])
    return out


def _dualopt_for(problem: Problem, mode: str, policy: Any = None) -> Any:
    from dualopt.keras import DualOpt

    opt = DualOpt(learning_rate=problem.lr, layer_index=list(LAYER_INDEX), **optimizer_kwargs(group_hyperparams(mode)))
    opt._fast_path_policy = policy
    return opt


def _lists_policy() -> Any:
    """The torch fast path with Adam on the core's lists (row ``keras DualOpt [torch] (core on lists)``)."""
    from dualopt.keras._torch import Policy

    return Policy(fused_adam=False)


def _native_adam_for(problem: Problem, mode: str) -> Any:
    import keras

    if mode != "none":
        raise NotImplementedError("keras.optimizers.Adam only runs mode 'none'")
    return keras.optimizers.Adam(learning_rate=problem.lr, epsilon=group_hyperparams("none")[NAMES[0]].eps)


def run_worker(command: str, payload: Any) -> Any:
    """Execute one batched request in this process (its Keras backend is already chosen).

    ``replay-lists`` and ``train-lists``: ``replay`` and ``train`` with :func:`_lists_policy` (torch only).
    """
    policy = _lists_policy() if command in ("replay-lists", "train-lists") else None
    if command in ("replay", "replay-lists"):
        return {case_id(c): replay_case(c, policy=policy) for c in payload}
    if command in ("train", "train-lists", "train-native"):
        problem, modes = payload
        # Before the optimizer exists: Keras creates its learning-rate variable in
        # floatx, and a float32 learning rate would move a float64 run by ~1e-7.
        keras_setup("float64")
        if command == "train-native":
            return {mode: train_problem(problem, _native_adam_for(problem, mode)) for mode in modes}
        return {mode: train_problem(problem, _dualopt_for(problem, mode, policy)) for mode in modes}
    raise ValueError(f"command={command!r} is invalid: expected 'replay', 'replay-lists', 'train', 'train-lists' "
                     "or 'train-native'.")


# --------------------------------------------------------------------------- in the suite's process
def _backend_module(backend: str) -> str:
    return {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}[backend]


def _run_subprocess(backend: str, command: str, payload: Any) -> Any:
    return run(backend, "dualopt.conformance.impl_keras", [command], payload)


def _unavailable(backend: str) -> str | None:
    for module in ("keras", _backend_module(backend)):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    return None


class KerasDualOpt:
    """``dualopt.keras.DualOpt`` on one Keras backend (open and closed loop).

    ``lists=True`` (torch only): the fast path with Adam on the core's lists, not torch's fused kernel.
    """

    def __init__(self, backend: str, *, lists: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")
        if lists and backend != "torch":
            raise ValueError("lists=True is the torch backend's fast-path variant; use backend='torch'.")
        self.backend = backend
        self._suffix = "-lists" if lists else ""
        self.name = f"keras DualOpt [{backend}]" + (" (core on lists)" if lists else "")
        self.framework = f"keras[{backend}]"
        # Tolerance class (spec/TOLERANCES.md): scalars are computed on the device from traced
        # step counts and learning rates; torch's CPU sqrt is not correctly rounded.
        self.numerics = "traced-scalars"

    def unavailable(self) -> str | None:
        return _unavailable(self.backend)

    def supports(self, case: Case) -> bool:
        return _supported(case)

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return _run_subprocess(self.backend, "replay" + self._suffix, [c for c in cases if _supported(c)])

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        return _run_subprocess(self.backend, "train" + self._suffix, (problem, list(modes)))


class KerasNativeAdam:
    """``keras.optimizers.Adam`` (closed loop, mode ``none`` only): the degenerate comparison."""

    def __init__(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")
        self.backend = backend
        self.name = f"keras.optimizers.Adam [{backend}]"
        self.framework = f"keras[{backend}]"
        self.numerics = "native-epsilon-hat"

    def unavailable(self) -> str | None:
        return _unavailable(self.backend)

    def supports(self, case: Case) -> bool:
        return False

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        raise NotImplementedError(f"{self.name} has no open-loop replay")

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        if list(modes) != ["none"]:
            raise NotImplementedError(f"{self.name} only trains mode 'none' (got {list(modes)})")
        return _run_subprocess(self.backend, "train-native", (problem, ["none"]))


def implementations() -> list[Implementation]:
    """DualOpt and native Adam on every Keras backend (each skipped when its backend is not installed), and
    torch's fast-path variant."""
    return ([KerasDualOpt(b) for b in BACKENDS] + [KerasDualOpt("torch", lists=True)]
            + [KerasNativeAdam(b) for b in BACKENDS])


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:], run_worker))
