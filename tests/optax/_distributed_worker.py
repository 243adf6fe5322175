"""The JAX sharding check: ``python -m tests.optax._distributed_worker REQUEST.pkl ANSWER.pkl`` (started by ``tests.common.distributed.run_workers``).

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (read by XLA at
its first import, hence a process of its own) and ``JAX_ENABLE_X64=1``.

The request is ``{"jobs": [...]}``; every job runs twice, once on one device
(no sharding at all) and once with every parameter a ``jax.Array`` placed by a
``NamedSharding`` on a 2x2 mesh ``("data", "model")``:

- kernels ``P("data", "model")`` (both dimensions split, the FSDP + tensor
  parallel layout), biases ``P("model")``;
- gradients (job ``update``) come with the parameters' shardings, input rows
  (job ``train``) are split over ``"data"``.

Jobs
----
``update``  the optimizer alone: ``steps`` jitted ``tx.update`` +
            ``optax.apply_updates`` on a fixed sequence of gradients (one of
            them holding a NaN, which must be skipped). Nothing in the update
            reduces across devices except the finiteness flag (a boolean
            ``all``), so the sharded run must give the unsharded run's bits.
``train``   the conformance problem's closed loop (``jax.grad`` of the MLP's
            loss + the update, one jitted step), weights after every epoch; the
            gradient's sums over the batch run per device and are then
            all-reduced, so they round differently from the one-device run.

Answers per job: the trajectories of both runs (float64 numpy, the problem's
names) and, for the sharded run, the sharding of every parameter and state
leaf after ``init`` and after the last step (every finetune leaf's anchor is
an array of its own in ``state.anchor``, sharded like its param).
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

import numpy as np

SPECS = {"kernel": ("data", "model"), "bias": ("model",)}


def nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"dense_0/kernel": v}`` -> ``{"dense_0": {"kernel": v}}`` (the Flax-like params layout)."""
    out: dict[str, dict[str, Any]] = {}
    for name, v in flat.items():
        layer, leaf = name.split("/")
        out.setdefault(layer, {})[leaf] = v
    return out


def flat(tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{layer}/{leaf}": v for layer, leaves in tree.items() for leaf, v in leaves.items()}


def main(src: str, dst: str) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dualopt.conformance.impl_optax import dualopt_kwargs
    from dualopt.conformance.problem import LAYER_INDEX, NAMES, group_hyperparams, make_problem
    from dualopt.optax import dualopt, leaf_paths, path_str

    with open(src, "rb") as fh:
        request = pickle.load(fh)
    devices = jax.devices()
    if len(devices) != 4 or not jax.config.jax_enable_x64:
        raise RuntimeError(f"needs 4 host devices and x64, got {devices} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
                           f"x64={jax.config.jax_enable_x64})")
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
    problem = make_problem()
    param_sharding = nest({n: NamedSharding(mesh, PartitionSpec(*SPECS[n.split("/")[1]])) for n in NAMES})
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def make_tx(job: dict[str, Any]) -> Any:
        hps = group_hyperparams(job["mode"], job.get("direction", "adam"))
        return dualopt(problem.lr, layer_index=nest(dict(zip(NAMES, LAYER_INDEX))), **dualopt_kwargs(hps, nest))

    def initial(sharded: bool) -> Any:
        params = nest({n: jnp.asarray(problem.weights[n], jnp.float64) for n in NAMES})
        return jax.device_put(params, param_sharding) if sharded else params

    def numpy_params(params: Any) -> dict[str, np.ndarray]:
        return {n: np.asarray(v).copy() for n, v in flat(params).items()}

    def layout(params: Any, state: Any) -> dict[str, Any]:
        """Per leaf: the param's spec, each state tensor's spec and whether it is equivalent to the param's."""
        out: dict[str, Any] = {}
        for name, p in flat(params).items():
            layer, leaf = name.split("/")
            entry = {"param": str(p.sharding.spec), "param_devices": len(p.sharding.device_set)}
            for field in ("mu", "nu", "anchor"):
                s = getattr(state, field).get(layer, {}).get(leaf)  # only finetune leaves have an anchor
                if s is None:
                    entry[field] = None
                    continue
                entry[field] = {"shape": tuple(s.shape), "spec": str(getattr(s.sharding, "spec", s.sharding)),
                                "devices": len(s.sharding.device_set),
                                "like_param": s.shape == p.shape and s.sharding.is_equivalent_to(p.sharding, p.ndim)}
            out[name] = entry
        out["count"] = {"devices": len(state.count.sharding.device_set),
                        "replicated": state.count.sharding.is_fully_replicated}
        return out

    def by_path(tree: Any) -> dict[str, np.ndarray]:
        return {path_str(p): np.asarray(v).copy() for p, v in zip(leaf_paths(tree), jax.tree.leaves(tree))}

    def loss(params: Any, x: Any, y: Any) -> Any:
        h = x
        for i in range(3):
            h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
            if i < 2:
                h = jnp.tanh(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    def run_update(job: dict[str, Any], sharded: bool) -> dict[str, Any]:
        tx = make_tx(job)
        rng = np.random.Generator(np.random.PCG64(job.get("seed", 3)))
        grads_seq = []
        for t in range(job["steps"]):
            g = {n: 0.1 * rng.standard_normal(problem.weights[n].shape) for n in NAMES}
            if t == job["steps"] // 3:
                g["dense_1/kernel"][3, 5] = np.nan  # one poisoned step: skipped, state unchanged
            grads_seq.append(g)
        params = initial(sharded)
        state = tx.init(params)
        answer: dict[str, Any] = {"layout_init": layout(params, state) if sharded else None}

        @jax.jit
        def step(params: Any, state: Any, grads: Any) -> Any:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        trajectory = []
        for g in grads_seq:
            grads = nest({n: jnp.asarray(v) for n, v in g.items()})
            if sharded:
                grads = jax.device_put(grads, param_sharding)
            params, state = step(params, state, grads)
            trajectory.append(numpy_params(params))
        answer.update(trajectory=trajectory, layout=layout(params, state) if sharded else None,
                      count=int(state.count), skipped=int(state.skipped),
                      state={f: by_path(getattr(state, f)) for f in ("mu", "nu", "anchor")})
        return answer

    def run_train(job: dict[str, Any], sharded: bool) -> dict[str, Any]:
        tx = make_tx(job)
        params = initial(sharded)
        state = tx.init(params)
        answer: dict[str, Any] = {"layout_init": layout(params, state) if sharded else None}

        @jax.jit
        def step(params: Any, state: Any, x: Any, y: Any) -> Any:
            grads = jax.grad(loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        trajectory = []
        for epoch in range(job["epochs"]):
            for x, y in problem.batches():
                x, y = jnp.asarray(x), jnp.asarray(y)
                if sharded:
                    x, y = jax.device_put(x, rows), jax.device_put(y, rows)
                params, state = step(params, state, x, y)
            trajectory.append(numpy_params(params))
        answer.update(trajectory=trajectory, layout=layout(params, state) if sharded else None,
                      count=int(state.count), skipped=int(state.skipped))
        return answer

    runners = {"update": run_update, "train": run_train}
    answers = {}
    for job in request["jobs"]:
        run = runners[job["kind"]]
        answers[job["name"]] = {"single": run(job, sharded=False), "sharded": run(job, sharded=True)}
    with open(dst, "wb") as fh:
        pickle.dump({"jax": jax.__version__, "devices": [str(d) for d in devices], "jobs": answers}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
