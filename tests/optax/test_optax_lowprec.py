"""bfloat16 and float16 parameters with ``dualopt.optax`` (SPEC 6: float32 compute and state).

The problem of ``tests/common/lowprec_data.py`` with every leaf in bfloat16 or float16
(the loss is evaluated in float32), a jitted ``tx.update`` +
``optax.apply_updates`` step, x64 off. DualOpt (scratch; finetune backbone +
scratch head) must stay finite, keep ``mu``, ``nu`` and the anchors float32,
decrease the loss and end within ``LOSS_TOLERANCE`` of its float32 run, and
within ``VS_ADAMW`` of ``optax.adamw`` in the same dtype where AdamW trains.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from tests.common import lowprec_data as lp  # noqa: E402
from dualopt.optax import dualopt  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_jax():
    with jax.enable_x64(False):
        yield


def params(dtype) -> dict:
    w = lp.initial_weights()
    return {"backbone": {f"layers_{i}": {"kernel": jnp.asarray(k, dtype), "bias": jnp.asarray(b, dtype)}
                         for i, (k, b) in enumerate(w[:-1])},
            "head": {"kernel": jnp.asarray(w[-1][0], dtype), "bias": jnp.asarray(w[-1][1], dtype)}}


def forward(p, x):
    h = x.astype(p["head"]["kernel"].dtype)
    for i in range(len(p["backbone"])):
        layer = p["backbone"][f"layers_{i}"]
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(forward(p, x).astype(jnp.float32), y).mean()


def make(kind: str):
    if kind == "adamw":
        return optax.adamw(lp.LR, weight_decay=lp.WEIGHT_DECAY)
    if kind == "scratch":
        return dualopt(lp.LR, weight_decay=lp.WEIGHT_DECAY)
    return dualopt(lp.LR, weight_decay=lp.WEIGHT_DECAY, paradigm={"backbone": "finetune", "head": "scratch"})


_RUNS: dict = {}


def train(kind: str, dtype: str) -> dict:
    if (kind, dtype) in _RUNS:
        return _RUNS[kind, dtype]
    tx = make(kind)
    p = params(jnp.dtype(dtype))
    state = tx.init(p)

    @jax.jit
    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    x, y = lp.data()
    losses = []
    for k in range(lp.STEPS):
        p, state, loss = step(p, state, *lp.batch(k, x, y))
        losses.append(float(loss))
    final = float(loss_fn(p, x, y))
    arrays = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating) and a.size]
    out = {"first": losses[0], "final": final, "state": state,
           "finite": all(math.isfinite(v) for v in losses) and all(bool(jnp.all(jnp.isfinite(a)))
                                                                   for a in jax.tree.leaves(p)),
           "state_dtypes": {str(a.dtype) for a in arrays}, "param_dtypes": {str(a.dtype) for a in jax.tree.leaves(p)}}
    _RUNS[kind, dtype] = out
    return out


@pytest.mark.parametrize("kind", ["scratch", "finetune"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_trains_like_float32(dtype, kind):
    ref = train(kind, "float32")
    got = train(kind, dtype)
    adamw = train("adamw", dtype)
    print(f"\n[lowprec optax {dtype} {kind}] final loss {got['final']:.4f} (float32 {ref['final']:.4f}, "
          f"AdamW {dtype} {adamw['final']:.4f}, initial {got['first']:.4f})")
    assert got["param_dtypes"] == {dtype}
    assert got["state_dtypes"] == {"float32"}, got["state_dtypes"]
    if kind == "finetune":
        # the backbone's four leaves have float32 anchors; the scratch head has none
        anchor = got["state"].anchor
        assert list(anchor) == ["backbone"] and len(jax.tree.leaves(anchor)) == 4
        assert {x.dtype for x in jax.tree.leaves(anchor)} == {jnp.dtype(jnp.float32)}
    assert got["finite"]
    assert got["final"] < (0.5 if kind == "scratch" else 0.8) * got["first"]
    assert abs(got["final"] - ref["final"]) <= lp.LOSS_TOLERANCE[dtype], (got["final"], ref["final"])
    if kind == "scratch" and adamw["finite"]:
        assert got["final"] <= adamw["final"] + lp.VS_ADAMW, (got["final"], adamw["final"])
