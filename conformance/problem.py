"""The closed-loop problem every framework trains: same data, weights, batches and hyperparameters.

A 16-32-32-4 tanh MLP with softmax cross-entropy (mean over the batch) on a
data set drawn from a fixed PCG64 seed and labelled by a fixed random teacher.
Weights are stored Keras-style: kernels are ``(in, out)`` and a layer computes
``x @ kernel + bias``; torch's ``nn.Linear.weight`` is the transpose.

Tensor order (which is also the default layer order) is
``dense_0/kernel, dense_0/bias, dense_1/kernel, dense_1/bias, dense_2/kernel, dense_2/bias``.
Every framework passes :data:`LAYER_INDEX` explicitly (one layer per Dense),
so numbering never depends on a framework's parameter order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from decoupled_core import HyperParams

SIZES = (16, 32, 32, 4)
N_SAMPLES = 256
BATCH_SIZE = 32
EPOCHS = 25  # 8 batches per epoch -> 200 steps
LR = 1e-2
EPS = 1e-8
NAMES = tuple(f"dense_{i}/{w}" for i in range(3) for w in ("kernel", "bias"))
LAYER_INDEX = (0, 0, 1, 1, 2, 2)
MODES = ("scratch", "finetune", "mixed", "none")


@dataclass(frozen=True)
class Problem:
    x: np.ndarray  # (N, 16) float64
    y: np.ndarray  # (N,) int64 class labels
    weights: dict[str, np.ndarray]  # the "pretrained" initial weights, float64
    batch_size: int = BATCH_SIZE
    epochs: int = EPOCHS
    lr: float = LR

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def batches(self):
        """Fixed order: batch k of every epoch is rows ``[k*B, (k+1)*B)``."""
        for k in range(self.steps_per_epoch):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield self.x[sl], self.y[sl]


def make_problem(seed: int = 0) -> Problem:
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.standard_normal((N_SAMPLES, SIZES[0]))
    teacher = rng.standard_normal((SIZES[0], SIZES[-1]))
    y = np.argmax(np.tanh(x @ teacher) + 0.3 * rng.standard_normal((N_SAMPLES, SIZES[-1])), axis=1).astype(np.int64)
    weights = {}
    for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        weights[f"dense_{i}/kernel"] = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        weights[f"dense_{i}/bias"] = 0.1 * rng.standard_normal((fan_out,))
    return Problem(x=x, y=y, weights=weights)


def group_hyperparams(mode: str, direction: str = "adam") -> dict[str, HyperParams]:
    """Per-tensor hyperparameters for ``mode``.

    ``mixed``: the two hidden Dense layers are a pretrained backbone in
    ``finetune`` and the output Dense is a new head in ``scratch``.
    ``none``: no pull (the degenerate case compared with native Adam).
    """
    ft = HyperParams(direction=direction, paradigm="finetune", rollback_max=5.0, rollback_min=0.0, eps=EPS)
    sc = HyperParams(direction=direction, paradigm="scratch", weight_decay=0.5, eps=EPS)
    no = HyperParams(direction=direction, paradigm="none", eps=EPS)
    if mode == "scratch":
        return {n: sc for n in NAMES}
    if mode == "finetune":
        return {n: ft for n in NAMES}
    if mode == "mixed":
        return {n: (sc if n.startswith("dense_2") else ft) for n in NAMES}
    if mode == "none":
        return {n: no for n in NAMES}
    raise ValueError(f"mode={mode!r} is invalid: expected one of {MODES}.")


def forward_numpy(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = x
    for i in range(3):
        h = h @ weights[f"dense_{i}/kernel"] + weights[f"dense_{i}/bias"]
        if i < 2:
            h = np.tanh(h)
    return h


def loss_and_grads_numpy(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Hand-written backprop: the core's own closed loop needs no framework."""
    acts = [x]
    pre = []
    h = x
    for i in range(3):
        z = h @ weights[f"dense_{i}/kernel"] + weights[f"dense_{i}/bias"]
        pre.append(z)
        h = np.tanh(z) if i < 2 else z
        acts.append(h)
    logits = acts[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y].mean()
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    d /= n
    grads = {}
    for i in reversed(range(3)):
        grads[f"dense_{i}/kernel"] = acts[i].T @ d
        grads[f"dense_{i}/bias"] = d.sum(axis=0)
        if i > 0:
            d = (d @ weights[f"dense_{i}/kernel"].T) * (1.0 - acts[i] ** 2)
    return float(loss), grads
