"""The Keras distribution check: :func:`run` (launched by ``test_keras_distributed.py`` through ``_launcher``).

Needs ``KERAS_BACKEND=jax``, ``JAX_ENABLE_X64=1`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (all read once per
process). Every job trains the conformance problem's float64 MLP
(``dualopt.conformance.impl_keras.build_problem_model``: the layers compute in
float64, which ``keras.layers.Dense`` does not on jax in Keras 3.15) with
``model.fit(x, y, batch_size=32, epochs=..., shuffle=False)`` and
:class:`dualopt.keras.DualOpt`, twice: without a distribution (one device)
and under ``job["distribution"]``:

``data``   ``keras.distribution.DataParallel`` over the 4 devices: variables
           replicated, every batch of 32 rows split into 4 x 8.
``model``  ``keras.distribution.ModelParallel`` on a 2x2 mesh ``("batch",
           "model")`` whose ``LayoutMap`` splits every kernel's output dimension
           and every bias over ``"model"``: variables sharded, batches split in 2.

Answers per job: both trajectories (weights after every epoch) and, for the
distributed run, where every model variable and every optimizer slot
(moments, anchor) lives: its sharding spec and device count.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def run(request: dict[str, Any]) -> dict[str, Any]:
    """The answers to ``request["jobs"]`` (module docstring), with the versions of Keras and jax."""
    import jax
    import keras

    from dualopt.conformance.impl_keras import build_problem_model, float64_layers, optimizer_kwargs
    from dualopt.conformance.problem import LAYER_INDEX, group_hyperparams, make_problem
    from dualopt.keras import DualOpt

    devices = jax.devices()
    if keras.backend.backend() != "jax" or len(devices) != 4 or not jax.config.jax_enable_x64:
        raise RuntimeError(f"needs the jax backend, 4 host devices and x64; got {keras.backend.backend()}, {devices}, "
                           f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    keras.config.set_floatx("float64")  # before any optimizer: its learning-rate variable takes floatx
    problem = make_problem()

    def distribution(kind: str) -> Any:
        if kind == "data":
            return keras.distribution.DataParallel(devices=devices)
        mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices=devices)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts["dense_.*/kernel"] = (None, "model")
        layouts["dense_.*/bias"] = ("model",)
        return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")

    def where(v: Any) -> dict[str, Any]:
        value = v.value
        return {"spec": str(getattr(value.sharding, "spec", value.sharding)), "devices": len(value.sharding.device_set),
                "shape": tuple(value.shape)}

    def train(job: dict[str, Any]) -> dict[str, Any]:
        model = build_problem_model(problem)
        _, loss = float64_layers()
        opt = DualOpt(learning_rate=problem.lr, layer_index=list(LAYER_INDEX),
                      **optimizer_kwargs(group_hyperparams(job["mode"])))
        model.compile(optimizer=opt, loss=loss())
        trajectory: list[dict[str, np.ndarray]] = []

        def record(epoch: int, logs: Any) -> None:
            trajectory.append({v.path: np.array(keras.ops.convert_to_numpy(v), dtype=np.float64)
                               for v in model.trainable_variables})

        model.fit(problem.x, problem.y, batch_size=problem.batch_size, epochs=job["epochs"], shuffle=False,
                  verbose=0, callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=record)])
        slots = {}
        for fact in opt._facts:  # the optimizer's record of every variable's slots (backends/keras/_optimizer.py)
            for role, slot in zip(("m", "v") if opt.direction == "adam" else ("momentum",), fact.slots):
                slots[f"{fact.path}/{role}"] = where(slot)
            if fact.anchor is not None:
                slots[f"{fact.path}/anchor"] = where(fact.anchor)
        return {"trajectory": trajectory, "variables": {v.path: where(v) for v in model.trainable_variables},
                "slots": slots, "skipped": int(keras.ops.convert_to_numpy(opt._skipped)),
                "step": int(keras.ops.convert_to_numpy(opt._step_count))}

    answers = {}
    for job in request["jobs"]:
        keras.distribution.set_distribution(None)
        single = train(job)
        dist = distribution(job["distribution"])
        keras.distribution.set_distribution(dist)
        try:
            distributed = train(job)
            batch_layout = dist.get_data_layout((problem.batch_size, problem.x.shape[1]))
            distributed["batch_axes"] = tuple(batch_layout.axes)
            distributed["mesh"] = dict(zip(dist.device_mesh.axis_names, dist.device_mesh.shape))
        finally:
            keras.distribution.set_distribution(None)
        answers[job["name"]] = {"single": single, "distributed": distributed}
    return {"keras": keras.__version__, "jax": jax.__version__, "jobs": answers}
