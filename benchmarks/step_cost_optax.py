"""Step cost of dualopt.optax against optax.adamw, in one process, on the same params.

Each variant is one jitted step ``(params, state, grads) -> (params, state)``
that runs ``tx.update`` and ``optax.apply_updates``, with params and state
donated (``donate_argnums=(0, 1)``) on both sides so that XLA updates the
buffers in place. Variants are timed interleaved (one call of each per
repeat, in rotating order), and the report gives the median per variant and
its ratio to ``optax.adamw`` measured in the same repeats.

Parameter sets (float32):

- ``8x1024^2``: eight 1024x1024 matrices (large, memory-bound);
- ``2000x32^2``: two thousand 32x32 matrices (many small leaves);
- ``vit-b``: ViT-B/16-like shapes (patch embedding, position embedding, 12
  blocks of qkv 768x2304, proj 768x768, mlp 768x3072 and 3072x768 with
  biases and two layernorms, final layernorm, 1000-way head): 86.6M params.

DualOpt runs in scratch mode (whole model, no anchor read) and in finetune
mode (backbone finetune toward anchors, head scratch), each with
``nonfinite="skip"`` (the default: one all-finite check over the gradients,
then a select) and ``nonfinite="propagate"`` (no check).

Usage::

    python benchmarks/step_cost_optax.py                 # all sets, 15 repeats
    python benchmarks/step_cost_optax.py --sets vit-b --repeats 31
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np

SETS = ("8x1024^2", "2000x32^2", "vit-b")


def make_params(name: str) -> dict[str, Any]:
    """Numpy float32 params for a set (a nested dict, Flax-like)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))

    if name == "8x1024^2":
        return {f"layers_{i}": {"kernel": w(1024, 1024)} for i in range(8)}
    if name == "2000x32^2":
        return {f"layers_{i}": {"kernel": w(32, 32)} for i in range(2000)}
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
    raise ValueError(f"set={name!r} is invalid: expected one of {SETS}.")


def variants(set_name: str) -> dict[str, Callable[[], Any]]:
    import optax

    from dualopt.optax import dualopt

    head = "head" if set_name == "vit-b" else "layers_" + ("7" if set_name == "8x1024^2" else "1999")
    finetune = lambda path: "scratch" if path[0] == head else "finetune"  # noqa: E731
    out = {"optax.adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2)}
    for policy in ("skip", "propagate"):
        out[f"dualopt scratch {policy}"] = lambda p=policy: dualopt(1e-3, layer_index="module", nonfinite=p)
        out[f"dualopt finetune {policy}"] = lambda p=policy: dualopt(1e-3, paradigm=finetune, layer_index="module",
                                                                     nonfinite=p)
    return out


def bench_set(set_name: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp
    import optax

    host = make_params(set_name)
    grads = jax.tree.map(lambda p: jnp.asarray(np.float32(1e-3) * p + np.float32(1e-4)), host)
    runs: dict[str, list[Any]] = {}
    for name, make in variants(set_name).items():
        tx = make()
        params = jax.tree.map(jnp.asarray, host)  # a fresh copy per variant (donated below)
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        runs[name] = [fn, params, state]
    times: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, params, state = runs[name]
            jax.block_until_ready((params, state))
            t0 = time.perf_counter()
            params, state = fn(params, state, grads)
            jax.block_until_ready((params, state))
            dt = time.perf_counter() - t0
            runs[name][1:] = [params, state]
            if r >= warmup:
                times[name].append(dt)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {SETS}")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    print(f"jax {jax.__version__}, devices {jax.devices()}, float32 params, jitted step with donated params+state")
    print(f"{'set':<10} {'variant':<26} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'ratio':>7}  bar")
    for set_name in args.sets.split(","):
        times = bench_set(set_name, args.repeats, args.warmup)
        base = statistics.median(times["optax.adamw"])
        for name, ts in times.items():
            med = statistics.median(ts)
            q = np.percentile(ts, [10, 90]) * 1e3
            ratio = med / base
            bar = "" if name == "optax.adamw" else ("<= 1.05" if "scratch" in name else "<= 1.20")
            ok = "" if not bar else (" ok" if ratio <= float(bar[3:]) else " OVER")
            print(f"{set_name:<10} {name:<26} {med * 1e3:>10.2f} {q[0]:>8.2f} {q[1]:>8.2f} {ratio:>7.3f}  {bar}{ok}")


if __name__ == "__main__":
    main()
