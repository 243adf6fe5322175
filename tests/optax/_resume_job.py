"""The training job of the Optax resume checks, shared by the tests and by ``_resume_worker.py``.

A small MLP as a nested dict (``backbone/Dense_0``, ``Dense_1``, ``Dense_10``:
the natural layer order is not the flatten order) and a ``head``, trained with
cross-entropy on fixed numpy data by a jitted step
(``tx.update`` + ``optax.apply_updates``), with a cosine learning-rate schedule
(evaluated at the state's ``count``) and one NaN gradient step (skipped,
counted in ``skipped``). x64 is off, as most users run.

Checkpoints are pickle-free: every leaf of ``(params, state)`` goes into an
``.npz`` under its key-path string (bfloat16 leaves as their raw uint16 bits,
with the dtype names in a ``__dtypes__`` entry), and is read back with
``allow_pickle=False`` either *into a template* (``jax.eval_shape`` of
``tx.init``: the usual restore) or *as saved* (nested dicts rebuilt from the
key paths, as a restore without a target does). Neither reader checks shapes
against the model: that is the transform's job, which the tests check.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualopt.optax import DualOptState, dualopt, path_str

N_STEPS = 16
RESUME_AT = (1, 2, 7, 15)
LR = 0.02
NAN_STEP = 5
MODES = ("scratch", "finetune", "mixed")
WIDTHS = {"Dense_0": (6, 8), "Dense_1": (8, 8), "Dense_10": (8, 8)}  # natural order 0, 1, 10


@dataclass(frozen=True)
class Config:
    mode: str = "mixed"
    direction: str = "adam"
    dtype: str = "float32"
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def init_params(cfg: Config, widths: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed + 100)
    dt = jnp.dtype(cfg.dtype)
    layer = lambda i, o: {"kernel": jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), dt),  # noqa: E731
                          "bias": jnp.asarray(0.1 * rng.standard_normal(o), dt)}
    widths = widths or WIDTHS
    last = list(widths.values())[-1][1]
    return {"backbone": {k: layer(*w) for k, w in widths.items()}, "head": layer(last, 3)}


def make_tx(cfg: Config, **overrides: Any) -> optax.GradientTransformationExtraArgs:
    kw = dict(direction=cfg.direction, momentum=0.9, nesterov=cfg.direction == "sgd", weight_decay=0.5,
              rollback_max=20.0, rollback_min=1.0, layer_index="module")
    kw["paradigm"] = {"scratch": "scratch", "finetune": "finetune",
                      "mixed": {"backbone": "finetune", "head": "scratch"}}[cfg.mode]
    kw.update(overrides)
    return dualopt(optax.cosine_decay_schedule(LR, N_STEPS, alpha=0.1), **kw)


def forward(params: Any, x: Any) -> Any:
    h = x
    for name in sorted(params["backbone"], key=lambda k: int(k.split("_")[1])):
        layer = params["backbone"][name]
        h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params: Any, x: Any, y: Any) -> Any:
    logits = forward(params, x.astype(params["head"]["kernel"].dtype)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 6)).astype(np.float32), rng.integers(0, 3, 16).astype(np.int32))
            for _ in range(N_STEPS)]


@functools.lru_cache(maxsize=None)
def compiled_step(cfg: Config):
    """One jitted step per configuration and process (compiling costs seconds; the step is a pure function)."""
    return make_step(make_tx(cfg))


def make_step(tx: optax.GradientTransformationExtraArgs):
    @jax.jit
    def step(params, state, x, y, poison):
        grads = jax.grad(loss_fn)(params, x, y)
        k = grads["backbone"]["Dense_0"]["kernel"]
        grads["backbone"]["Dense_0"]["kernel"] = k.at[0, 0].add(jnp.where(poison, jnp.nan, 0.0).astype(k.dtype))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def train(step, params: Any, state: Any, start: int, stop: int, data: list | None = None) -> tuple[Any, Any]:
    data = data if data is not None else batches()
    for k in range(start, stop):
        x, y = data[k]
        params, state = step(params, state, x, y, k == NAN_STEP)
    return params, state


# ------------------------------------------------------------------------------------------ checkpoints

def flatten(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(e, "key", getattr(e, "name", getattr(e, "idx", e))) for e in path)
        out[f"{prefix}/{path_str(keys)}"] = np.asarray(leaf)
    return out


def _storable(v: np.ndarray) -> np.ndarray:
    """numpy's own dtypes as they are; ml_dtypes' (bfloat16, not a numpy builtin) as their raw bits."""
    return v if v.dtype.isbuiltin == 1 else v.view(f"u{v.itemsize}")


def save(path: str, params: Any, state: Any, step: int) -> None:
    """Write an ``.npz`` atomically (numpy writes ``tmp``, then ``os.replace``)."""
    arrays = {**flatten(params, "params"), **flatten(state, "state")}
    dtypes = {k: str(v.dtype) for k, v in arrays.items()}
    raw = {k: _storable(v) for k, v in arrays.items()}
    raw["__dtypes__"] = np.asarray(json.dumps(dtypes))
    raw["__step__"] = np.asarray(step)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **raw)
    os.replace(tmp, path)


def read(path: str) -> tuple[dict[str, np.ndarray], int]:
    """Every saved array (bfloat16 bits viewed back), and the step."""
    with np.load(path, allow_pickle=False) as z:
        dtypes = json.loads(str(z["__dtypes__"]))
        arrays = {k: z[k].view(jnp.dtype(dtypes[k])) for k in dtypes}
        return arrays, int(z["__step__"])


def restore_into(arrays: dict[str, np.ndarray], params_template: Any, state_template: Any) -> tuple[Any, Any]:
    """The usual restore: each template leaf takes the saved array of its key path (no shape check)."""
    def fill(template: Any, prefix: str) -> Any:
        treedef = jax.tree_util.tree_structure(template)
        keys = list(flatten(jax.tree.map(lambda _: np.zeros(()), template), prefix))
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[k]) for k in keys])

    return fill(params_template, "params"), fill(state_template, "state")


def restore_as_saved(arrays: dict[str, np.ndarray]) -> tuple[Any, DualOptState]:
    """A restore without a target: nested dicts from the key paths, the state's fields by name."""
    nested: dict[str, Any] = {}
    for key, value in arrays.items():
        *parents, last = key.split("/")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(value)
    st = nested["state"]
    # A field with no arrays (the anchors of a state without finetune leaves, {}) saves no key.
    return nested["params"], DualOptState(**{f: st.get(f, {}) for f in DualOptState._fields})


def templates(tx: Any, cfg: Config) -> tuple[Any, Any]:
    params = jax.eval_shape(lambda: init_params(cfg))
    return params, jax.eval_shape(tx.init, params)


def snapshot(params: Any, state: Any) -> dict[str, np.ndarray]:
    arrays = {**flatten(params, "params"), **flatten(state, "state")}
    return {k: _storable(v) for k, v in arrays.items()} | {f"dtype/{k}": np.asarray(str(v.dtype)) for k, v in arrays.items()}
