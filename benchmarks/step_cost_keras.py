"""Step cost of dualopt.keras against keras.optimizers.AdamW on every Keras backend, one process per backend.

    python benchmarks/step_cost_keras.py [--backends jax,torch,tensorflow] [--sets 8x1024^2,64x128^2]
                                         [--repeats 9] [--steps 8] [--threads N] [--tiny]

Keras picks its backend once per process, so the driver starts one worker per
backend (``KERAS_BACKEND=<b> python step_cost_keras.py --worker``) and prints
its table. In a worker every candidate optimizer gets its own copy of the same
float32 model (same initial weights, same data, same batches) and is measured
two ways:

- ``fit``: ``model.fit`` over ``--steps`` batches (``shuffle=False``,
  ``verbose=0``), i.e. what a user's training loop costs per step, forward and
  backward included, with Keras's default ``jit_compile="auto"``: XLA on jax,
  a ``tf.function`` graph without XLA on tensorflow (Keras 3.15 resolves
  "auto" to False there on a machine without a GPU), eager on torch;
- ``apply``: the optimizer alone, compiled:
  ``jax.jit(optimizer.stateless_apply)`` with donated buffers on jax,
  ``tf.function(optimizer.apply, jit_compile=True)`` (XLA) on tensorflow and eager
  ``optimizer.apply`` on torch (where DualOpt runs its ``torch._foreach_``
  fast path; ``DualOpt scratch, generic loop`` is the per-variable
  ``update_step`` loop a Keras subclass gets without one).

``AdamW, same check`` (``apply`` only) is Keras's AdamW run only when every
gradient is finite, checked as DualOpt checks: the guarded route that issue 21
prices the skip rows against (propagate rows against plain AdamW; bars 1.0x
scratch, 1.15x finetune, in the ``contract`` column).

Repeats are interleaved (each repeat times every candidate once, in a rotated
order) so that drifts of a shared machine hit all candidates alike; the table
gives medians and the ratio to ``keras.optimizers.AdamW`` measured in the same
repeats. The bar (issue 5) is DualOpt scratch <= 1.1x AdamW; finetune reads
one more tensor (the anchor) per element and has no bar.

Parameter sets (Dense layers with bias, float32):

- ``8x1024^2``: eight 1024x1024 Dense layers (8.4 M parameters, 16 variables):
  large tensors, memory-bound;
- ``64x128^2``: sixty-four 128x128 Dense layers (1.1 M parameters, 128
  variables): many small variables, per-variable overhead;
- ``--tiny``: one 4x64^2 set, AdamW and DualOpt scratch/finetune, 2 repeats
  (CI smoke runs; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
BACKENDS = ("jax", "torch", "tensorflow")
SETS = {"8x1024^2": (1024, 8), "64x128^2": (128, 64)}  # (width, number of Dense layers)
TINY_SET = {"4x64^2": (64, 4)}
BASELINE = "AdamW"
#: AdamW under DualOpt's finiteness check: the reference of the skip rows (apply only).
GUARDED = "AdamW, same check"
BAR = 1.1
#: Issue 21: skip against the guarded route, propagate against AdamW (scratch; finetune reads the anchor).
BARS = {"scratch": 1.0, "finetune": 1.15}
BATCH = 32
LR = 1e-3


# --------------------------------------------------------------------------- worker (one Keras backend)
def _candidates(backend: str) -> dict[str, Callable[[], Any]]:
    import keras

    from dualopt.keras import DualOpt

    finetune = dict(paradigm={"head": "scratch"}, default_paradigm="finetune")
    out: dict[str, Callable[[], Any]] = {
        BASELINE: lambda: keras.optimizers.AdamW(learning_rate=LR, weight_decay=1e-2),
        GUARDED: lambda: keras.optimizers.AdamW(learning_rate=LR, weight_decay=1e-2),
        "DualOpt scratch": lambda: DualOpt(LR, weight_decay=1e-2),
        "DualOpt scratch propagate": lambda: DualOpt(LR, weight_decay=1e-2, nonfinite="propagate"),
        "DualOpt finetune": lambda: DualOpt(LR, **finetune),
        "DualOpt finetune propagate": lambda: DualOpt(LR, nonfinite="propagate", **finetune),
    }
    if backend == "torch":
        def generic() -> Any:
            opt = DualOpt(LR, weight_decay=1e-2)
            opt._use_fast_path = False  # the per-variable update_step loop (for comparison only)
            return opt

        out["DualOpt scratch, generic loop"] = generic
    return out


def _model(width: int, depth: int, weights: list[Any] | None) -> Any:
    import keras

    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="tanh", name=f"dense_{i}") for i in range(depth - 1)]
    layers += [keras.layers.Dense(width, name="head")]
    model = keras.Sequential(layers)
    if weights is not None:
        model.set_weights(weights)
    return model


def _time_apply(backend: str, model: Any, opt: Any, grads_np: list[Any], guarded: bool = False) -> Callable[[], float]:
    """A callable that runs one compiled optimizer step and returns its wall time.

    ``guarded``: the step runs only when every gradient is finite, checked as
    DualOpt's ``nonfinite="skip"`` checks (``dualopt.keras._optimizer._all_finite``):
    AdamW under the same check, the reference of the skip rows (issue 21).
    """
    from keras import ops

    variables = model.trainable_variables
    opt.build(variables)
    if backend == "jax":
        import jax

        grads = [jax.numpy.asarray(g) for g in grads_np]

        def step(opt_vars: list[Any], gs: list[Any], model_vars: list[Any]) -> tuple[list[Any], list[Any]]:
            if guarded:
                from dualopt.keras._optimizer import _all_finite

                new_vars, new_opt = jax.lax.cond(_all_finite(gs), lambda: opt.stateless_apply(opt_vars, gs, model_vars),
                                                 lambda: (model_vars, opt_vars))
            else:
                new_vars, new_opt = opt.stateless_apply(opt_vars, gs, model_vars)
            # Outputs in the donated inputs' order: jax pairs donated buffers with outputs by shape
            # in order, and stateless_apply's (vars, opt) order paired each weight with a moment,
            # which made XLA copy every buffer (AdamW 53 -> 21 ms on 8x1024^2).
            return new_opt, new_vars

        fn = jax.jit(step, donate_argnums=(0, 2))
        state = {"opt": [v.value for v in opt.variables], "vars": [v.value for v in variables]}

        def run() -> float:
            t0 = time.perf_counter()
            new_opt, new_vars = fn(state["opt"], grads, state["vars"])
            jax.block_until_ready((new_vars, new_opt))
            dt = time.perf_counter() - t0
            state["opt"], state["vars"] = new_opt, new_vars
            return dt

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        grads = [tf.constant(g) for g in grads_np]

        def tf_step(gs: list[Any]) -> None:
            if guarded:
                from dualopt.keras._optimizer import _all_finite

                def apply() -> Any:
                    opt.apply(gs, variables)
                    return tf.constant(True)

                tf.cond(_all_finite(gs), apply, lambda: tf.constant(False))
            else:
                opt.apply(gs, variables)

        fn = tf.function(tf_step, jit_compile=True)

        def run() -> float:
            t0 = time.perf_counter()
            fn(grads)
            dt = time.perf_counter() - t0
            return dt

        return run
    import torch

    grads = [ops.convert_to_tensor(g) for g in grads_np]

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            if guarded:
                from dualopt.keras._optimizer import _all_finite

                if bool(_all_finite(grads)):
                    opt.apply(grads, variables)
            else:
                opt.apply(grads, variables)
            return time.perf_counter() - t0

    return run


def _time_fit(model: Any, opt: Any, x: Any, y: Any) -> Callable[[], float]:
    model.compile(optimizer=opt, loss="mse")
    steps = len(x) // BATCH

    def run() -> float:
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return (time.perf_counter() - t0) / steps

    return run


def worker(set_names: list[str], repeats: int, steps: int, tiny: bool) -> dict[str, Any]:
    import keras
    import numpy as np

    backend = keras.backend.backend()
    keras.config.set_floatx("float32")
    sets = TINY_SET if tiny else SETS
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"backend": backend, "keras": keras.__version__, "sets": {},
                              "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    for set_name in set_names:
        width, depth = sets[set_name]
        weights = _model(width, depth, None).get_weights()
        x = rng.standard_normal((steps * BATCH, width)).astype("float32")
        y = rng.standard_normal((steps * BATCH, width)).astype("float32")
        grads_np = [(1e-3 * rng.standard_normal(w.shape)).astype("float32") for w in weights]
        cands = _candidates(backend)
        if tiny:  # smoke size: the baseline and one DualOpt per mode
            cands = {k: v for k, v in cands.items() if k in (BASELINE, GUARDED, "DualOpt scratch", "DualOpt finetune")}
        result: dict[str, Any] = {"variables": len(weights), "parameters": int(sum(w.size for w in weights)),
                                  "modes": {}}
        for mode in ("apply", "fit"):
            runners = {}
            for name, make in cands.items():
                if mode == "fit" and (name.endswith("generic loop") or name == GUARDED):
                    continue
                model = _model(width, depth, weights)
                runners[name] = (_time_apply(backend, model, make(), grads_np, guarded=name == GUARDED)
                                 if mode == "apply"
                                 else _time_fit(model, make(), x, y))
                runners[name]()  # warm-up: compile, build, first-touch pages
                runners[name]()
            times: dict[str, list[float]] = {n: [] for n in runners}
            names = list(runners)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(runners[name]())
            result["modes"][mode] = {n: statistics.median(ts) for n, ts in times.items()}
            del runners
        report["sets"][set_name] = result
    return report


# --------------------------------------------------------------------------- driver
def _run_backend(backend: str, argv: list[str], threads: int | None) -> dict[str, Any] | str:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_ENABLE_X64", None)  # float32 models, as users run them
    if threads:  # a shared machine: fewer threads, less oversubscription noise (same for every candidate)
        n = str(threads)
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TF_NUM_INTRAOP_THREADS=n, TF_NUM_INTEROP_THREADS="1",
                   XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                              f"{'false' if threads == 1 else 'true'} intra_op_parallelism_threads={n}").strip())
        argv = [*argv, "--threads", n]
    proc = subprocess.run([sys.executable, str(HERE), "--worker", *argv], env=env, capture_output=True, text=True,
                          cwd=HERE.parent.parent)
    if proc.returncode != 0:
        return f"worker failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(report: dict[str, Any], repeats: int) -> None:
    print(f"\nkeras {report['keras']} [{report['backend']}], float32, {repeats} interleaved repeats, "
          f"threads {report['threads']}, "
          f"bar: DualOpt scratch <= {BAR}x {BASELINE}")
    print(f"  issue 21's contract (apply): skip vs '{GUARDED}', propagate vs {BASELINE}; "
          f"bars scratch <= {BARS['scratch']}x, finetune <= {BARS['finetune']}x")
    print(f"  {'set':<10} {'mode':<6} {'optimizer':<31} {'median ms':>10} {'vs ' + BASELINE:>9} "
          f"{'vs guarded':>10}  bar (issue 5)  contract (issue 21)")
    for set_name, res in report["sets"].items():
        for mode, medians in res["modes"].items():
            base = medians[BASELINE]
            guarded = medians.get(GUARDED)
            for name, med in medians.items():
                ratio = med / base
                bar = ""
                if name in ("DualOpt scratch", "DualOpt scratch propagate"):
                    bar = f"<= {BAR}" + (" ok" if ratio <= BAR else " OVER")
                vs_guarded = f"{med / guarded:>9.2f}x" if guarded else f"{'-':>10}"
                contract = ""
                if name.startswith("DualOpt") and not name.endswith("generic loop"):
                    propagate = name.endswith("propagate")
                    ref = ratio if propagate else (med / guarded if guarded else None)
                    limit = BARS["finetune" if "finetune" in name else "scratch"]
                    if ref is not None:
                        contract = (f"{ref:.2f} vs {BASELINE if propagate else 'guarded'} <= {limit}"
                                    + (" ok" if ref <= limit else " OVER"))
                print(f"  {set_name:<10} {mode:<6} {name:<31} {med * 1e3:>10.3f} {ratio:>8.2f}x {vs_guarded}  "
                      f"{bar:<13}  {contract}")
        print(f"  ({set_name}: {res['variables']} variables, {res['parameters'] / 1e6:.2f} M parameters)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    ap.add_argument("--sets", default=None, help=f"comma-separated subset of {list(SETS)}")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 9; --tiny: 2)")
    ap.add_argument("--steps", type=int, default=None, help="batches per fit sample (default 8; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="smoke size: one 4x64^2 set, 3 optimizers, 2 repeats")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: each framework's)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.tiny else 9)
    steps = args.steps or (2 if args.tiny else 8)
    sets = (args.sets.split(",") if args.sets else list(TINY_SET if args.tiny else SETS))
    if args.worker:
        if args.threads and os.environ.get("KERAS_BACKEND") == "torch":
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(sets, repeats, steps, args.tiny)))
        return 0
    forward = ["--repeats", str(repeats), "--steps", str(steps), "--sets", ",".join(sets)]
    forward += ["--tiny"] if args.tiny else []
    failed = 0
    for backend in args.backends.split(","):
        missing = [m for m in ("keras", backend) if importlib.util.find_spec(m) is None]
        if missing:
            print(f"\nkeras [{backend}]: skipped ({missing[0]} not installed)")
            continue
        t0 = time.perf_counter()
        report = _run_backend(backend, forward, args.threads)
        if isinstance(report, str):
            print(f"\nkeras [{backend}]: {report}")
            failed += 1
            continue
        print_report(report, repeats)
        print(f"  (worker wall time {time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
