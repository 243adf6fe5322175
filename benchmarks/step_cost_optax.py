"""Step cost of dualopt.optax against optax.adamw, in one process, on the same params.

Each variant is one jitted step ``(params, state, grads) -> (params, state)``
that runs ``tx.update`` and ``optax.apply_updates``, float32 (x64 off), with
params and state donated (``donate_argnums=(0, 1)``) on every side so that XLA
updates the buffers in place; the gradients are the same arrays for every
variant and are not donated. Variants are timed interleaved (one call of each
per repeat, in rotating order, each call blocked until its outputs are ready
before the next starts), and the report gives the median per variant and its
ratio to ``optax.adamw`` (``weight_decay=1e-2`` on every leaf, so it does its
decay too) measured in the same repeats.

A donated buffer is reused for the whole run, so each variant keeps the memory
it was given when it was built, and two variants that compile to the same
program can differ by more than the bars' margins (up to 0.25 in one run). The
control row below measures that spread in every run. (Copying params and state
into fresh memory before every call narrowed it on 8x1024^2, but made every
2000x32^2 step half as slow again, and ran ViT-B out of 24 GiB.)

Reference rows:

- ``optax.adamw``: the issue's bar (DualOpt scratch <= 1.05x, finetune <= 1.2x).
- ``optax.adamw (control)``: a second ``optax.adamw``, built last. Its ratio is
  the run's noise between two identical programs; read the other rows to that.
- ``apply_if_finite(adamw)``: ``optax.apply_if_finite(optax.adamw(...))``,
  AdamW with the same step-skipping semantics as DualOpt's default
  ``nonfinite="skip"``. ``adamw`` does no finite check, so it is the fair
  reference for ``nonfinite="propagate"``; skipping a step exactly needs one more
  read of the gradients before anything is written, whoever implements it.

DualOpt runs in scratch mode (every leaf pulled toward 0, no anchor) and in
finetune mode (backbone pulled toward its anchors, head scratch), each with
``nonfinite="skip"`` (the default) and ``"propagate"`` (no check). By default
leaves of at most 65536 elements take DualOpt's C kernels on CPU
(``dualopt._optax_native``); the ``, XLA only`` rows trace the same transform
inside ``dualopt._optax_native.disabled()``, so that every leaf takes XLA's
operations, and show what the kernels change.

Columns: median / p10 / p90 wall-clock milliseconds per step and the median's
ratio to ``optax.adamw`` (the bar); the median process CPU time per step (all
threads) and its ratio, which a busy shared machine inflates less than wall
time (time spent descheduled is not counted); XLA's static count of bytes the
compiled step reads and writes per parameter element
(``compiled.cost_analysis()``; noise-free, so it shows what the ratio should be
on a memory-bound machine; on CPU the DualOpt "skip" rows count 4 bytes more
than a finite step moves: the operands of the ``lax.cond`` whose exact fallback
runs only when a gradient's sum is not finite) and its ratio, ``-`` where the
step calls the C kernels (XLA does not count what a custom call moves); compile
time (tracing included).

Parameter sets (float32):

- ``8x1024^2``: eight 1024x1024 matrices (large, memory-bound);
- ``2000x32^2``: two thousand 32x32 matrices (many small leaves: dispatch-bound);
- ``vit-b``: ViT-B/16-like shapes (patch embedding, position embedding, 12
  blocks of qkv 768x2304, proj 768x768, mlp 768x3072 and 3072x768 with
  biases and two layernorms, final layernorm, 1000-way head): 86.6M params.

Usage::

    python benchmarks/step_cost_optax.py                     # all sets, 15 repeats
    python benchmarks/step_cost_optax.py --sets 2000x32^2 --repeats 5
    python benchmarks/step_cost_optax.py --tiny              # smoke run (seconds): tiny sets, 3 repeats
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from typing import Any, Callable

import numpy as np

SETS = ("8x1024^2", "2000x32^2", "vit-b")
TINY_SETS = ("4x64^2", "20x8^2")
BARS = {"scratch": 1.05, "finetune": 1.20}


def make_params(name: str) -> dict[str, Any]:
    """Numpy float32 params for a set (a nested dict, Flax-like); ``"<n>x<d>^2"`` is n d-by-d matrices."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    if name == "vit-b":
        d, mlp = 768, 3072
        params: dict[str, Any] = {
            "embed": {"kernel": w(16 * 16 * 3, d), "bias": w(d)},
            "pos_embedding": w(197, d),
            "cls": w(1, 1, d),
        }
        for i in range(12):
            params[f"encoderblock_{i}"] = {
                "ln_0": {"scale": w(d), "bias": w(d)},
                "qkv": {"kernel": w(d, 3 * d), "bias": w(3 * d)},
                "proj": {"kernel": w(d, d), "bias": w(d)},
                "ln_1": {"scale": w(d), "bias": w(d)},
                "mlp_0": {"kernel": w(d, mlp), "bias": w(mlp)},
                "mlp_1": {"kernel": w(mlp, d), "bias": w(d)},
            }
        params["encoder_norm"] = {"scale": w(d), "bias": w(d)}
        params["head"] = {"kernel": w(d, 1000), "bias": w(1000)}
        return params
    try:
        count, side = name.split("x")
        n, d = int(count), int(side.removesuffix("^2"))
    except ValueError:
        raise ValueError(f"set={name!r} is invalid: expected one of {SETS} or '<n>x<d>^2'.") from None
    return {f"layers_{i}": {"kernel": w(d, d)} for i in range(n)}


def head_of(params: dict[str, Any]) -> str:
    """The top-level key trained from scratch in finetune mode: ``head``, else the deepest ``layers_N``."""
    if "head" in params:
        return "head"
    return max(params, key=lambda k: int(k.rsplit("_", 1)[1]))


def variants(params: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    import optax

    from dualopt.optax import dualopt

    head = head_of(params)
    finetune = lambda path: "scratch" if path[0] == head else "finetune"  # noqa: E731
    out: dict[str, Callable[[], Any]] = {
        "optax.adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
        "apply_if_finite(adamw)": lambda: optax.apply_if_finite(optax.adamw(1e-3, weight_decay=1e-2), 10),
    }
    for policy in ("skip", "propagate"):
        out[f"dualopt scratch {policy}"] = lambda p=policy: dualopt(1e-3, layer_index="module", nonfinite=p)
        out[f"dualopt finetune {policy}"] = lambda p=policy: dualopt(1e-3, paradigm=finetune, layer_index="module",
                                                                     nonfinite=p)
    for mode in ("scratch", "finetune"):
        out[f"dualopt {mode} skip{XLA_ONLY}"] = out[f"dualopt {mode} skip"]
    out[CONTROL] = out["optax.adamw"]
    return out


#: Suffix of the variants traced without DualOpt's C kernels.
XLA_ONLY = ", XLA only"
#: The second optax.adamw (built last): the noise between identical programs in one run.
CONTROL = "optax.adamw (control)"


def bytes_accessed(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("bytes accessed", float("nan")))


def bench_set(set_name: str, repeats: int,
              warmup: int) -> tuple[dict[str, list[tuple[float, float]]], dict[str, dict[str, float]]]:
    """``(times, info)``: per variant (wall, cpu) seconds of each repeat, and its bytes/element and compile time."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt._optax_native import disabled

    host = make_params(set_name)
    elements = sum(p.size for p in jax.tree.leaves(host))
    grads = jax.tree.map(lambda p: jnp.asarray(np.float32(1e-3) * p + np.float32(1e-4)), host)
    runs: dict[str, list[Any]] = {}
    info: dict[str, dict[str, float]] = {}
    for name, make in variants(host).items():
        tx = make()
        params = jax.tree.map(jnp.asarray, host)  # a fresh copy per variant (donated below)
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        t0 = time.perf_counter()
        with disabled() if name.endswith(XLA_ONLY) else contextlib.nullcontext():
            fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        native = "dualopt_xla_" in fn.as_text()
        info[name] = {"compile_s": time.perf_counter() - t0,
                      "bytes_per_element": float("nan") if native else bytes_accessed(fn) / elements}
        runs[name] = [fn, params, state]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, params, state = runs[name]
            jax.block_until_ready((params, state))
            t0, c0 = time.perf_counter(), time.process_time()
            params, state = fn(params, state, grads)
            jax.block_until_ready((params, state))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs[name][1:] = [params, state]
            if r >= warmup:
                times[name].append((wall, cpu))
    return times, info


def report(set_name: str, times: dict[str, list[tuple[float, float]]], info: dict[str, dict[str, float]]) -> list[str]:
    base = statistics.median(w for w, _ in times["optax.adamw"])
    base_cpu = statistics.median(c for _, c in times["optax.adamw"])
    base_bytes = info["optax.adamw"]["bytes_per_element"]
    lines = []
    for name, samples in times.items():
        ts = [w for w, _ in samples]
        med, cpu = statistics.median(ts), statistics.median(c for _, c in samples)
        q = np.percentile(ts, [10, 90]) * 1e3
        ratio = med / base
        mode = next((m for m in BARS if m in name), None)
        verdict = "" if mode is None else f"<= {BARS[mode]:.2f} " + ("ok" if ratio <= BARS[mode] else "OVER")
        b = info[name]["bytes_per_element"]
        traffic = f"{'-':>6} {'-':>7}" if math.isnan(b) else f"{b:>6.1f} {b / base_bytes:>7.3f}"
        lines.append(f"{set_name:<10} {name:<35} {med * 1e3:>9.2f} {q[0]:>8.2f} {q[1]:>8.2f} {ratio:>7.3f} "
                     f"{cpu * 1e3:>8.2f} {cpu / base_cpu:>7.3f} {traffic} "
                     f"{info[name]['compile_s']:>9.1f}  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=None, help=f"comma-separated subset of {SETS} (or '<n>x<d>^2')")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 15; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help=f"smoke run: sets {TINY_SETS}, 3 repeats, 1 warmup")
    args = ap.parse_args(argv)
    sets = args.sets.split(",") if args.sets else list(TINY_SETS if args.tiny else SETS)
    repeats = args.repeats or (3 if args.tiny else 15)
    warmup = 1 if args.tiny else args.warmup

    import jax

    jax.config.update("jax_enable_x64", False)
    print(f"jax {jax.__version__}, devices {jax.devices()}, float32 params, jitted step with donated params+state, "
          f"{repeats} interleaved repeats after {warmup} warm-up")
    print(f"{'set':<10} {'variant':<35} {'median ms':>9} {'p10 ms':>8} {'p90 ms':>8} {'ratio':>7} "
          f"{'cpu ms':>8} {'ratio':>7} {'B/elt':>6} {'ratio':>7} {'compile s':>9}  bar (median ratio vs optax.adamw)")
    for set_name in sets:
        times, info = bench_set(set_name, repeats, warmup)
        for line in report(set_name, times, info):
            print(line, flush=True)


if __name__ == "__main__":
    main()
