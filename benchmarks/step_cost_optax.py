"""Step cost of dualopt.optax against optax.adamw, in one process, on the same params.

Each variant is one jitted step ``(params, state, grads) -> (params, state)``
that runs ``tx.update`` and ``optax.apply_updates``, float32 (x64 off), with
params and state donated (``donate_argnums=(0, 1)``) on every side so that XLA
updates the buffers in place; the gradients are the same arrays for every
variant and are not donated. Variants are timed interleaved: one call of each
per repeat, each call blocked until its outputs are ready before the next
starts, in a new random order every repeat (in a fixed cyclic order a
variant's time depended on the one before it: on 8x1024^2 the row that always
followed ``apply_if_finite(adamw)`` measured 0.06 over the same program
elsewhere). The report gives the median per variant and its ratio to
``optax.adamw`` (``weight_decay=1e-2`` on every leaf, so it does its decay too)
measured in the same repeats.

Where a variant is built in the process matters too: a donated buffer is reused
for the whole run, so each variant keeps the memory it was given when it was
built, and on 2000x32^2 two builds of the same program measured up to 0.33
apart in one process, the later-built slower. So each set is measured
``--orders`` times (default 3), each in its own process with the variants built
in a rotated order (the first process builds ``optax.adamw`` first, the others
start further down the list), and the ``ratio`` column is the median over the
processes of each process's own ratio, with their range beside it. The control
row below measures what is left of the spread. (Copying params and state into
fresh memory before every call also narrowed it on 8x1024^2, but made every
2000x32^2 step half as slow again, and ran ViT-B out of 24 GiB.)

Reference rows:

- ``optax.adamw``: the reference of every ratio column, and of the
  ``propagate`` rows' contract (issue 21: scratch <= 1.0x, finetune <= 1.15x).
- ``optax.adamw (control)``: a second ``optax.adamw``, last in the list (so
  built last in the first process). Its ratio and range are the run's noise
  between two identical programs; read the other rows to that.
- ``apply_if_finite(adamw)``: ``optax.apply_if_finite(optax.adamw(...))``,
  AdamW with the same step-skipping semantics as DualOpt's default
  ``nonfinite="skip"``. ``adamw`` does no finite check, so it is the fair
  reference for ``nonfinite="propagate"``; skipping a step exactly needs one more
  read of the gradients before anything is written, whoever implements it. The
  ``skip`` rows' contract is priced against this row (issue 21: scratch <= 1.0x,
  finetune <= 1.15x): per process the row's ratio over this one's, then the
  median over the processes, for wall and CPU time.

DualOpt runs in scratch mode (every leaf pulled toward 0, no anchor) and in
finetune mode (backbone pulled toward its anchors, head scratch), each with
``nonfinite="skip"`` (the default) and ``"propagate"`` (no check).

Columns: median / p10 / p90 wall-clock milliseconds per step (the repeats of
every process pooled); the ratio to ``optax.adamw`` (the bar: in each process
the variant's median over AdamW's median, then the median of those over the
processes) and its lowest and highest value over the processes; the median
process CPU time per step (all threads) and its ratio (likewise), which a busy
shared machine inflates less than wall time (time spent descheduled is not
counted); XLA's static count of bytes the
compiled step reads and writes per parameter element
(``compiled.cost_analysis()``; noise-free, so it shows what the ratio should be
on a memory-bound machine; on CPU the DualOpt "skip" rows count 4 bytes more
than a finite step moves: the operands of the ``lax.cond`` whose exact fallback
runs only when a gradient's sum is not finite) and its ratio; compile time
(tracing included).

Parameter sets (float32):

- ``8x1024^2``: eight 1024x1024 matrices (large, memory-bound);
- ``2000x32^2``: two thousand 32x32 matrices (many small leaves: dispatch-bound);
- ``vit-b``: ViT-B/16-like shapes (patch embedding, position embedding, 12
  blocks of qkv 768x2304, proj 768x768, mlp 768x3072 and 3072x768 with
  biases and two layernorms, final layernorm, 1000-way head): 86.6M params.

Usage::

    python benchmarks/step_cost_optax.py                     # all sets, 3 build orders of 15 repeats
    python benchmarks/step_cost_optax.py --sets 2000x32^2 --repeats 5 --orders 1
    python benchmarks/step_cost_optax.py --tiny              # smoke run: tiny sets, 2 orders of 3 repeats
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

SETS = ("8x1024^2", "2000x32^2", "vit-b")
TINY_SETS = ("4x64^2", "20x8^2")
#: Issue 21's contract: ``skip`` rows against GUARDED, ``propagate`` rows against optax.adamw.
BARS = {"scratch": 1.0, "finetune": 1.15}
#: AdamW with the same skipping semantics as DualOpt's default ``nonfinite="skip"``.
GUARDED = "apply_if_finite(adamw)"


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
    out[CONTROL] = out["optax.adamw"]
    return out


#: A second optax.adamw, last in the list: the noise between identical programs.
CONTROL = "optax.adamw (control)"


def bytes_accessed(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("bytes accessed", float("nan")))


Times = dict[str, list[tuple[float, float]]]  # per variant: (wall, cpu) seconds of each timed call
Info = dict[str, dict[str, float]]  # per variant: bytes_per_element, compile_s


def build_order(names: list[str], order: int, orders: int) -> list[str]:
    """``names`` rotated to start at the ``order``-th of ``orders`` evenly spaced places (order 0: as given)."""
    k = order * len(names) // orders
    return names[k:] + names[:k]


def bench_set(set_name: str, repeats: int, warmup: int, order: int = 0, orders: int = 1) -> tuple[Times, Info]:
    """``(times, info)`` of one process: the variants built in :func:`build_order`, then timed interleaved."""
    import jax
    import jax.numpy as jnp
    import optax

    host = make_params(set_name)
    elements = sum(p.size for p in jax.tree.leaves(host))
    grads = jax.tree.map(lambda p: jnp.asarray(np.float32(1e-3) * p + np.float32(1e-4)), host)
    makers = variants(host)
    runs: dict[str, list[Any]] = {}
    info: Info = {}
    for name in build_order(list(makers), order, orders):
        tx = makers[name]()
        params = jax.tree.map(jnp.asarray, host)  # a fresh copy per variant (donated below)
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        t0 = time.perf_counter()
        fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
        info[name] = {"compile_s": time.perf_counter() - t0, "bytes_per_element": bytes_accessed(fn) / elements}
        runs[name] = [fn, params, state]
    times: Times = {n: [] for n in makers}
    names = list(makers)
    rng = np.random.default_rng(order)  # the timing order of every repeat, reproducible per process
    for r in range(warmup + repeats):
        for name in rng.permutation(names).tolist():
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


def bench_set_orders(set_name: str, repeats: int, warmup: int, orders: int) -> list[tuple[Times, Info]]:
    """:func:`bench_set` in ``orders`` child processes, one per build order (in this process when 1)."""
    if orders == 1:
        return [bench_set(set_name, repeats, warmup)]
    out = []
    for order in range(orders):
        argv = [sys.executable, __file__, "--sets", set_name, "--repeats", str(repeats), "--warmup", str(warmup),
                "--orders", str(orders), "--child-order", str(order)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{set_name}, build order {order} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(({n: [tuple(x) for x in v] for n, v in result["times"].items()}, result["info"]))
    return out


def report(set_name: str, runs: list[tuple[Times, Info]]) -> list[str]:
    """One line per variant; ratios are per process (its own ``optax.adamw``), then the median over processes."""
    base = [[statistics.median(x[col] for x in t["optax.adamw"]) for col in (0, 1)] for t, _ in runs]

    def ratios(name: str, col: int) -> list[float]:  # col 0: wall, 1: cpu
        return [statistics.median(x[col] for x in t[name]) / b[col] for (t, _), b in zip(runs, base)]

    def ref_ratios(ref: str, col: int) -> list[float]:  # the reference's own per-process ratio
        return ratios(ref, col)

    base_bytes = runs[0][1]["optax.adamw"]["bytes_per_element"]
    lines = []
    for name in runs[0][0]:
        ts = [w for t, _ in runs for w, _ in t[name]]
        med, cpu = statistics.median(ts), statistics.median(c for t, _ in runs for _, c in t[name])
        q = np.percentile(ts, [10, 90]) * 1e3
        walls = ratios(name, 0)
        ratio = statistics.median(walls)
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        mode = next((m for m in BARS if m in name), None)
        verdict = ""
        if mode is not None:
            ref = GUARDED if name.endswith("skip") else "optax.adamw"
            vs_ref = statistics.median(w / r for w, r in zip(walls, ref_ratios(ref, 0)))
            vs_ref_cpu = statistics.median(c / r for c, r in zip(ratios(name, 1), ref_ratios(ref, 1)))
            verdict = (f"<= {BARS[mode]:.2f} " + ("ok" if vs_ref <= BARS[mode] else "OVER")
                       + f" ({vs_ref:.3f}, cpu {vs_ref_cpu:.3f} vs {ref})")
        b = runs[0][1][name]["bytes_per_element"]
        traffic = f"{'-':>6} {'-':>7}" if math.isnan(b) else f"{b:>6.1f} {b / base_bytes:>7.3f}"
        compile_s = statistics.median(info[name]["compile_s"] for _, info in runs)
        lines.append(f"{set_name:<10} {name:<35} {med * 1e3:>9.2f} {q[0]:>8.2f} {q[1]:>8.2f} {ratio:>7.3f} "
                     f"{spread:>11} {cpu * 1e3:>8.2f} {statistics.median(ratios(name, 1)):>7.3f} {traffic} "
                     f"{compile_s:>9.1f}  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=None, help=f"comma-separated subset of {SETS} (or '<n>x<d>^2')")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 15; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--orders", type=int, default=None,
                    help="build orders per set, one process each (default 3; 2 with --tiny; 1: this process)")
    ap.add_argument("--child-order", type=int, default=None, help=argparse.SUPPRESS)  # one order; prints JSON
    ap.add_argument("--tiny", action="store_true", help=f"smoke run: sets {TINY_SETS}, 2 orders of 3 repeats")
    args = ap.parse_args(argv)
    sets = args.sets.split(",") if args.sets else list(TINY_SETS if args.tiny else SETS)
    repeats = args.repeats or (3 if args.tiny else 15)
    warmup = 1 if args.tiny else args.warmup
    orders = args.orders if args.orders is not None else (2 if args.tiny else 3)
    if orders < 1:
        ap.error(f"--orders={orders} is invalid: expected an integer >= 1")

    import jax

    jax.config.update("jax_enable_x64", False)
    if args.child_order is not None:
        times, info = bench_set(sets[0], repeats, warmup, args.child_order, orders)
        print(json.dumps({"times": times, "info": info}))
        return
    print(f"jax {jax.__version__}, devices {jax.devices()}, float32 params, jitted step with donated params+state, "
          f"{orders} build order(s) x {repeats} interleaved repeats after {warmup} warm-up")
    print(f"{'set':<10} {'variant':<35} {'median ms':>9} {'p10 ms':>8} {'p90 ms':>8} {'ratio':>7} {'range':>11} "
          f"{'cpu ms':>8} {'ratio':>7} {'B/elt':>6} {'ratio':>7} {'compile s':>9}  contract (issue 21: skip vs "
          f"{GUARDED}, propagate vs optax.adamw; wall, then CPU-time ratio)")
    for set_name in sets:
        for line in report(set_name, bench_set_orders(set_name, repeats, warmup, orders)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
