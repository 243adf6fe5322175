"""Step cost against a hand-written OLOR, against the memory-bandwidth floor, and optimizer-state memory.

Usage::

    .venv/bin/python benchmarks/floor_memory.py            # full sizes (~5 min on 2 idle cores, ~9 GB of memory)
    .venv/bin/python benchmarks/floor_memory.py --tiny     # seconds; what CI smoke-runs

Three tables per parameter set (8 x 1024^2, 2000 x 32^2, ViT-B-like):

1. **Step time.** Median seconds per ``optimizer.step()`` (gradients fixed,
   already computed) for torch AdamW (fused and the CPU default), a
   straightforward per-tensor OLOR / LPWD in plain torch (``olor_naive.py``),
   and ``dualopt.torch.DualOpt`` in the scratch and finetune paradigms, with the
   default non-finite check (``nonfinite="skip"``) and without it
   (``"propagate"``). Rows are timed in interleaved rounds (shuffled order each
   round) and summarised by the median, so that noise from other processes on
   the machine hits every row alike.
2. **Floor.** An optimizer step must at least read theta, g and the state (and
   the anchor in finetune) and write theta and the state: 7 float32 words per
   element for Adam-type steps, 8 with an anchor (7.5 with a 2-byte anchor).
   The floor is those bytes divided by the memory bandwidth measured in the
   same rounds with two streaming kernels on large tensors, each counted as 3
   words per element: ``a.add_(b)`` (read-modify-write, the access pattern of
   an optimizer step) and ``torch.add(a, b, out=c)`` (STREAM "add"; the
   write-allocate read of ``c`` is not counted, as in STREAM). The *faster* of
   the two sets the bandwidth, so the floor is the strictest of the two.
   "% of floor" = floor time / measured time; 100 % would be a perfect
   streaming implementation.
3. **Memory.** Bytes held in ``optimizer.state`` after a step, per optimizer,
   and relative to AdamW; what the finetune anchor costs per element, and what
   a 2-byte (bfloat16/float16) anchor would save, measured with a hand-written
   OLOR that stores its anchor in bfloat16 (DualOpt has no such option; its
   effect on training is measured in ``quality/finetune.py``); with the
   fresh-process rows (on unless ``--no-peak``) the peak resident memory a step
   adds (state plus temporaries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
from olor_naive import NaiveOLOR, lpwd_rates, olor_kappas  # noqa: E402  (run as a script, from its own directory)

LR = 1e-3
WORD = 4  # float32


# ----------------------------------------------------------------------------- parameter sets
def vit_b_shapes(blocks: int = 12, dim: int = 768, mlp: int = 3072, tokens: int = 197, classes: int = 1000,
                 patch_in: int = 768) -> list[tuple[int, ...]]:
    """ViT-B/16 parameter shapes in module order (patch embedding, tokens, blocks, final norm, head)."""
    shapes: list[tuple[int, ...]] = [(dim, patch_in), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(blocks):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    shapes += [(dim,), (dim,), (classes, dim), (classes,)]
    return shapes


def param_sets(tiny: bool) -> dict[str, list[tuple[int, ...]]]:
    if tiny:
        return {"8x64^2": [(64, 64)] * 8, "50x32^2": [(32, 32)] * 50,
                "ViT-tiny-like (2 blocks, d=64)": vit_b_shapes(2, 64, 256, 17, 10, 48)}
    return {"8x1024^2": [(1024, 1024)] * 8, "2000x32^2": [(32, 32)] * 2000,
            "ViT-B-like (12 blocks, d=768)": vit_b_shapes()}


def make_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s).normal_(0, 0.02, generator=g))
        p.grad = torch.empty(s).normal_(0, 1e-3, generator=g)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- optimizers
def dualopt_class():
    """``dualopt.torch.DualOpt``, or the import error as a string."""
    try:
        from dualopt.torch import DualOpt
        return DualOpt
    except Exception as exc:  # noqa: BLE001 - report any failure as "unavailable"
        return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Row:
    name: str
    make: Callable[[list], torch.optim.Optimizer]
    bytes_per_element: float  # bytes each step must move per parameter element at the floor
    naive: str | None = None  # name of the hand-written counterpart


def rows() -> tuple[list[Row], str | None]:
    out = [
        Row("AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True), 7 * WORD),
        Row("AdamW (CPU default)", lambda ps: torch.optim.AdamW(ps, lr=LR), 7 * WORD),
        Row("naive OLOR (finetune)", lambda ps: NaiveOLOR(ps, olor_kappas(len(ps), 0.01 / LR), lr=LR), 8 * WORD),
        Row("naive OLOR, bfloat16 anchor", lambda ps: NaiveOLOR(ps, olor_kappas(len(ps), 0.01 / LR), lr=LR,
                                                                anchor_dtype=torch.bfloat16), 7 * WORD + 2),
        Row("naive LPWD (scratch)", lambda ps: NaiveOLOR(ps, lpwd_rates(len(ps), 1e-2), lr=LR, anchor=False),
            7 * WORD),
    ]
    cls = dualopt_class()
    if isinstance(cls, str):
        return out, cls
    for paradigm, words, naive in (("scratch", 7 * WORD, "naive LPWD (scratch)"),
                                   ("finetune", 8 * WORD, "naive OLOR (finetune)")):
        for nonfinite in ("skip", "propagate"):
            label = f"DualOpt {paradigm}" + ("" if nonfinite == "skip" else ", nonfinite=propagate")
            out.append(Row(label, (lambda ps, p=paradigm, n=nonfinite: cls(ps, lr=LR, paradigm=p, nonfinite=n)),
                           words, naive))
    return out, None


def check_against_naive(cls) -> dict:
    """DualOpt and the naive code implement the same rule: compare 20 float64 steps (max relative gap)."""
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5,), (3, 7), (3,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(20)]
    out = {}
    kappa = 0.01 / LR * 20
    bf16_anchor = [t.to(torch.bfloat16).to(t.dtype) for t in init]
    cases = {
        "finetune": ({"paradigm": "finetune", "rollback_max": kappa},
                     lambda ps: NaiveOLOR(ps, olor_kappas(len(ps), kappa), lr=LR)),
        "scratch": ({"paradigm": "scratch", "weight_decay": 5.0},
                    lambda ps: NaiveOLOR(ps, lpwd_rates(len(ps), 5.0), lr=LR, anchor=False)),
        # the bfloat16-anchor row computes DualOpt's rule with the anchor rounded to bfloat16
        "finetune, bfloat16 anchor": ({"paradigm": "finetune", "rollback_max": kappa, "anchor": bf16_anchor},
                                      lambda ps: NaiveOLOR(ps, olor_kappas(len(ps), kappa), lr=LR,
                                                           anchor_dtype=torch.bfloat16)),
    }
    for paradigm, (kw, naive) in cases.items():
        a = [torch.nn.Parameter(t.clone()) for t in init]
        b = [torch.nn.Parameter(t.clone()) for t in init]
        opt_a, opt_b = cls(a, lr=LR, **kw), naive(b)
        for gs in grads:
            for p, q, gr in zip(a, b, gs):
                p.grad, q.grad = gr.clone(), gr.clone()
            opt_a.step()
            opt_b.step()
        gap = max(float(((p - q).abs() / q.abs().clamp_min(1e-12)).max()) for p, q in zip(a, b))
        moved = max(float(((q - t).abs()).max()) for q, t in zip(b, init))
        out[paradigm] = {"max_relative_gap": gap, "max_abs_change": moved}
    torch.set_grad_enabled(True)
    return out


# ----------------------------------------------------------------------------- timing
def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, target_s: float, seed: int = 0) -> dict:
    """Per-call seconds of every fn, timed in ``rounds`` shuffled rounds of ``k`` calls each."""
    reps = {}
    for name, fn in fns.items():
        fn()  # warm-up (creates lazy state)
        t = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t, 1e-6)
        reps[name] = max(1, math.ceil(target_s / dt))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, k = fns[name], reps[name]
            t = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t) / k)
    return samples


def summary(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "n": len(xs)}


def bench_set(name: str, shapes, all_rows: list[Row], bw_elems: int, rounds: int, target_s: float) -> dict:
    params = make_params(shapes)
    numel = sum(p.numel() for p in params)
    opts = {r.name: r.make(params) for r in all_rows}
    a, b, c = (torch.rand(bw_elems) for _ in range(3))
    b.mul_(1e-6)  # a.add_(b) runs thousands of times: keep a bounded
    streams = {"stream a.add_(b)": lambda: a.add_(b), "stream add(a, b, out=c)": lambda: torch.add(a, b, out=c)}
    fns: dict[str, Callable[[], None]] = dict(streams)
    fns.update({n: o.step for n, o in opts.items()})
    samples = interleaved(fns, rounds, target_s)
    stream = {k: summary(samples.pop(k)) for k in streams}
    for st in stream.values():
        st["GBps"] = 3 * WORD * bw_elems / st["median"] / 1e9
    bandwidth = 1e9 * max(st["GBps"] for st in stream.values())
    res = {"set": name, "tensors": len(shapes), "elements": numel, "bandwidth_GBps": bandwidth / 1e9,
           "bandwidth_elems": bw_elems, "stream": stream, "rows": {}}
    adamw_state = state_bytes(opts["AdamW fused"])
    for r in all_rows:
        s = summary(samples[r.name])
        moved = r.bytes_per_element * numel
        sb = state_bytes(opts[r.name])
        res["rows"][r.name] = {
            **s, "bytes_per_step": moved, "floor_s": moved / bandwidth,
            "achieved_GBps": moved / s["median"] / 1e9, "pct_of_floor": 100 * (moved / bandwidth) / s["median"],
            "state_bytes": sb, "state_vs_adamw": sb / adamw_state, "state_bytes_per_element": sb / numel,
            "naive": r.naive,
        }
    fused = res["rows"]["AdamW fused"]["median"]
    for r in all_rows:
        row = res["rows"][r.name]
        row["x_adamw_fused"] = row["median"] / fused
        if r.naive:
            row["speedup_vs_naive"] = res["rows"][r.naive]["median"] / row["median"]
    del opts, params
    return res


# ----------------------------------------------------------------------------- peak memory (fresh process)
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(label: str, tiny: bool) -> None:
    """Run in a fresh process: growth of peak RSS from constructing the optimizer and taking 2 steps.

    The first step allocates any lazy state; the second is a steady step.

    Linux only: writing 5 to /proc/self/clear_refs resets the high-water mark
    (VmHWM), so the peak is measured from the moment the optimizer is built.
    """
    shapes = list(param_sets(tiny).values())[-1]
    params = make_params(shapes)
    row = {r.name: r for r in rows()[0]}[label]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    opt = row.make(params)
    for _ in range(2):
        opt.step()
    peak = _rss("VmHWM")
    print(json.dumps({"row": label, "peak_growth_bytes": peak - base, "state_bytes": state_bytes(opt)}))


def peak_memory(labels: list[str], tiny: bool) -> dict:
    out = {}
    for label in labels:
        proc = subprocess.run([sys.executable, __file__, "--peak-child", label] + (["--tiny"] if tiny else []),
                              capture_output=True, text=True, check=True)
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report
def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def anchor_cost(res: dict) -> list[str]:
    """What the finetune anchor costs, and what a 2-byte anchor would save (measured rows of one set)."""
    rows, n = res["rows"], res["elements"]
    cols = [("AdamW (fused)", "AdamW fused", None), ("DualOpt finetune (float32 anchor)", "DualOpt finetune", None),
            ("naive OLOR, float32 anchor", "naive OLOR (finetune)", None),
            ("naive OLOR, bfloat16 anchor", "naive OLOR, bfloat16 anchor", "naive OLOR (finetune)")]
    cols = [c for c in cols if c[1] in rows]
    lines = [f"### What the anchor costs ({res['set']}, {n / 1e6:.1f} M elements; training memory = weights + "
             "gradients + optimizer state, float32 weights and gradients)\n",
             "| | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    adam = rows["AdamW fused"]
    lines.append("| optimizer state, bytes/element | " + " | ".join(
        f"{rows[k]['state_bytes_per_element']:.1f} ({rows[k]['state_bytes'] / adam['state_bytes'] - 1:+.0%})"
        for _, k, _ in cols) + " |")
    lines.append("| training memory, bytes/element | " + " | ".join(
        f"{8 + rows[k]['state_bytes_per_element']:.1f} ({(8 * n + rows[k]['state_bytes']) / (8 * n + adam['state_bytes']) - 1:+.0%})"
        for _, k, _ in cols) + " |")
    lines.append("| training memory, this set | " + " | ".join(
        fmt_bytes(8 * n + rows[k]["state_bytes"]) for _, k, _ in cols) + " |")
    lines.append("| bytes moved per step (floor), bytes/element | " + " | ".join(
        f"{rows[k]['bytes_per_step'] / n:.0f}" for _, k, _ in cols) + " |")
    lines.append("| measured step time, x AdamW fused | " + " | ".join(
        f"{rows[k]['x_adamw_fused']:.2f}" for _, k, _ in cols) + " |")
    ref = [(k, r) for _, k, r in cols if r]
    for k, r in ref:
        lines.append("")
        lines.append(f"A bfloat16 anchor in the hand-written OLOR: state {rows[k]['state_bytes'] / rows[r]['state_bytes'] - 1:+.1%}, "
                     f"step time x{rows[k]['median'] / rows[r]['median']:.2f} against its float32-anchor twin "
                     f"(floor {rows[k]['floor_s'] / rows[r]['floor_s'] - 1:+.1%}).")
    lines.append("")
    return lines


def report(results: list[dict], check: dict | None, peaks: dict | None, unavailable: str | None) -> str:
    lines = []
    if unavailable:
        lines.append(f"DualOpt rows missing: dualopt.torch could not be imported ({unavailable}).\n")
    if check:
        lines.append("Same rule check (20 float64 steps, DualOpt vs naive, max relative gap): "
                     + ", ".join(f"{k} {v['max_relative_gap']:.1e} (weights moved up to {v['max_abs_change']:.1e})"
                                 for k, v in check.items()) + "\n")
    for res in results:
        lines.append(f"### {res['set']}: {res['tensors']} tensors, {res['elements'] / 1e6:.2f} M float32 elements\n")
        kernels = ", ".join(f"`{k.split(' ', 1)[1]}` {v['GBps']:.1f} GB/s" for k, v in res["stream"].items())
        lines.append(f"Streaming bandwidth (same rounds, {res['bandwidth_elems'] / 2**20:.0f} Mi float32 elements, "
                     f"3 words per element): {kernels}; the floor uses **{res['bandwidth_GBps']:.1f} GB/s**\n")
        lines.append("| optimizer | ms/step (median) | IQR ms | x AdamW fused | speed-up vs naive | floor ms "
                     "| achieved GB/s | % of floor |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in res["rows"].items():
            sp = f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else ""
            lines.append(f"| {name} | {1e3 * r['median']:.2f} | {1e3 * r['q1']:.2f}-{1e3 * r['q3']:.2f} "
                         f"| {r['x_adamw_fused']:.2f} | {sp} | {1e3 * r['floor_s']:.2f} | {r['achieved_GBps']:.1f} "
                         f"| {r['pct_of_floor']:.0f}% |")
        lines.append("")
    lines.append("### Optimizer state (bytes in optimizer.state after the steps above)\n")
    names = list(results[0]["rows"])
    lines.append("| optimizer | " + " | ".join(r["set"] for r in results) + " | bytes/element | vs AdamW |")
    lines.append("|---|" + "---:|" * (len(results) + 2))
    for n in names:
        last = results[-1]["rows"][n]
        lines.append(f"| {n} | " + " | ".join(fmt_bytes(r["rows"][n]["state_bytes"]) for r in results)
                     + f" | {last['state_bytes_per_element']:.1f} | {last['state_vs_adamw']:.2f}x |")
    lines.append("")
    lines += anchor_cost(results[-1])
    if peaks:
        lines.append(f"### Peak resident memory added by constructing the optimizer and 2 steps ({results[-1]['set']}, "
                     "fresh process per row)\n")
        lines.append("| optimizer | peak growth | of which state | temporaries (difference) |")
        lines.append("|---|---:|---:|---:|")
        for n, p in peaks.items():
            lines.append(f"| {n} | {fmt_bytes(p['peak_growth_bytes'])} | {fmt_bytes(p['state_bytes'])} "
                         f"| {fmt_bytes(p['peak_growth_bytes'] - p['state_bytes'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes, for CI smoke runs")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7; 3 with --tiny)")
    ap.add_argument("--no-peak", action="store_true", help="skip the fresh-process peak-memory rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 with --tiny, where spin-waiting threads "
                         "on a busy machine would dominate)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        _peak_child(args.peak_child, args.tiny)
        return 0
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    all_rows, unavailable = rows()
    rounds = args.rounds or (3 if args.tiny else 7)
    target = 0.002 if args.tiny else 0.05
    bw_elems = 2**20 if args.tiny else 2**26
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{rounds} interleaved rounds per set; lr={LR}")
    check = None if unavailable else check_against_naive(dualopt_class())
    results = []
    for name, shapes in param_sets(args.tiny).items():
        results.append(bench_set(name, shapes, all_rows, bw_elems, rounds, target))
    peaks = None
    if not args.no_peak:
        labels = [r.name for r in all_rows if "propagate" not in r.name]
        if args.tiny:  # one fresh process per row: keep the smoke run short
            labels = [n for n in labels if n in ("AdamW fused", "DualOpt finetune")]
        peaks = peak_memory(labels, args.tiny)
    text = report(results, check, peaks, unavailable)
    print(text)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "check": check, "peaks": peaks,
                                        "unavailable": unavailable, "torch": torch.__version__,
                                        "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
