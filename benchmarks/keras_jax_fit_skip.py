"""Where ``nonfinite="skip"`` costs time in Keras-on-jax ``model.fit`` (issue 21): one process, interleaved.

Usage::

    .venv/bin/python benchmarks/keras_jax_fit_skip.py [--repeats 15] [--steps-per-execution 1] [--tiny]

The model and data are ``step_cost_keras.py``'s ``8x1024^2`` set (eight 1024-wide
Dense layers, batch 32, 8 batches per ``fit``). Each row changes one thing:

- ``AdamW``, and ``AdamW, same check and cond``: Keras's AdamW under DualOpt's
  check and ``lax.cond`` (the guarded route of issue 21, inside ``fit``);
- ``DualOpt propagate`` and ``DualOpt skip`` (scratch);
- ``skip, check without cond``: the check is made (it feeds the counters), the
  update runs unconditionally;
- ``skip, cond on one element``: the ``lax.cond`` on a predicate that reads one
  gradient element instead of the check;
- ``propagate, barrier``: every gradient complete before any update
  (``lax.optimization_barrier``), no check and no cond.

The variants subclass private methods of ``dualopt.keras.DualOpt``; they are a
measurement, not an API. Findings: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

WIDTH, DEPTH, BATCH, STEPS, LR = 1024, 8, 32, 8, 1e-3


def candidates() -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp
    import keras

    from dualopt.keras import DualOpt
    from dualopt.keras._optimizer import _all_finite

    class GuardedAdamW(keras.optimizers.AdamW):
        def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> None:
            base = super()._backend_update_step
            touched = list(trainable_variables) + list(self.variables)
            current = [v.value for v in touched]

            def applied() -> list[Any]:
                with keras.StatelessScope(state_mapping=list(zip(touched, current))) as scope:
                    base(grads, trainable_variables, learning_rate)
                return [c if n is None else n for n, c in zip([scope.get_current_value(v) for v in touched], current)]

            for v, value in zip(touched, jax.lax.cond(_all_finite(grads), applied, lambda: current)):
                v.assign(value)

    class CheckWithoutCond(DualOpt):
        def _jax_cond_update(self, finite: Any, update: Callable[[], None], trainable_variables: Any) -> None:
            update()

    class CondOnOneElement(DualOpt):
        def _all_finite(self, grads: Any) -> Any:
            return jnp.isfinite(grads[0].reshape(-1)[0])

    class Barrier(DualOpt):
        def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> None:
            super()._backend_update_step(list(jax.lax.optimization_barrier(list(grads))), trainable_variables,
                                         learning_rate)

    return {
        "AdamW": lambda: keras.optimizers.AdamW(LR),
        "AdamW, same check and cond": lambda: GuardedAdamW(LR),
        "DualOpt propagate": lambda: DualOpt(learning_rate=LR, nonfinite="propagate"),
        "DualOpt skip": lambda: DualOpt(learning_rate=LR),
        "skip, check without cond": lambda: CheckWithoutCond(learning_rate=LR),
        "skip, cond on one element": lambda: CondOnOneElement(learning_rate=LR),
        "propagate, barrier": lambda: Barrier(learning_rate=LR, nonfinite="propagate"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps-per-execution", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="smoke size: 2 layers of width 64, 1 repeat")
    args = ap.parse_args(argv)
    width, depth, repeats = (64, 2, 1) if args.tiny else (WIDTH, DEPTH, args.repeats)
    import jax
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        raise SystemExit(f"KERAS_BACKEND is {keras.backend.backend()!r}; this benchmark is for jax")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, width)).astype("float32")
    y = rng.standard_normal((STEPS * BATCH, width)).astype("float32")

    def model() -> Any:
        layers = [keras.layers.Dense(width, activation="tanh") for _ in range(depth - 1)]
        return keras.Sequential([keras.Input((width,)), *layers, keras.layers.Dense(width)])

    weights = model().get_weights()
    runs: dict[str, Callable[[], float]] = {}
    for name, make in candidates().items():
        m = model()
        m.set_weights(weights)
        m.compile(optimizer=make(), loss="mse", steps_per_execution=args.steps_per_execution)

        def run(m: Any = m) -> float:
            t0 = time.perf_counter()
            m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            return (time.perf_counter() - t0) / STEPS

        run()
        run()  # compile, first touch
        runs[name] = run
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(runs[name]())
    base = statistics.median(times["AdamW"])
    print(f"Keras {keras.__version__} on jax {jax.__version__}, model.fit, {depth}x{width}^2, batch {BATCH}, "
          f"steps_per_execution {args.steps_per_execution}, {repeats} interleaved repeats, "
          f"load {os.getloadavg()[0]:.2f}")
    for name in names:
        med = statistics.median(times[name])
        print(f"  {name:28s} {med * 1e3:8.2f} ms/step  {med / base:5.2f}x AdamW")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
