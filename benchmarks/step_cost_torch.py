"""Cost of one optimizer step: DualOpt (torch) against torch.optim.AdamW, measured in one process.

    python benchmarks/step_cost_torch.py [--repeats 21] [--sets 8x1024^2,2000x32^2,vit-b]
                                         [--threads N] [--clock wall|cpu] [--no-reference] [--no-compiled]
                                         [--device cpu|cuda] [--tiny]

What is timed is ``optimizer.step()`` alone (no forward or backward), on float32
tensors (CPU, or ``--device cuda``). For every parameter set all candidates step the *same* parameters
with the *same* gradients, each with its own state:

- ``AdamW fused``: ``torch.optim.AdamW(fused=True)``, the bar of ``nonfinite="propagate"``
  (issue 21: scratch <= 1.0x, finetune <= 1.15x of it);
- ``AdamW fused, guarded (GradScaler route)``: what a careful torch user runs for the same
  safety as DualOpt's default ``nonfinite="skip"``: one
  ``torch._amp_foreach_non_finite_check_and_unscale_`` pass over the gradients, then fused
  AdamW with ``found_inf`` (it skips on the device). The bar of the skip rows (issue 21:
  scratch <= 1.0x, finetune <= 1.15x of it);
- ``AdamW for-loop``: ``torch.optim.AdamW(foreach=False)``, torch's default on CPU;
- ``DualOpt scratch`` / ``DualOpt finetune``: the default fast path (finetune:
  the C kernel of ``dualopt.torch._native`` where it builds; the header line says), with
  ``nonfinite="skip"`` (the default: one read of the gradients for the NaN/Inf
  check, which AdamW does not make) and with ``nonfinite="propagate"`` (no check);
- ``DualOpt finetune, no C kernel``: the same optimizer as ``DualOpt finetune``
  with the C kernel turned off for its steps (torch's fused Adam kernel plus a
  multi-tensor pull), so that the table shows what the kernel buys; a line per
  set gives the difference;
- ``DualOpt finetune reference loop``: ``foreach=False``, the per-tensor loop over
  ``decoupled_core`` (a third of the repeats; ``--no-reference`` drops it);
- ``DualOpt finetune compiled``: ``torch.compile(opt.step, fullgraph=True)`` (Inductor) of the
  default finetune optimizer: the core's rule traced and fused by the compiler. Compiling takes
  a while (minutes for thousands of tensors), so sets of more than ``COMPILE_MAX_TENSORS``
  tensors, ``--tiny`` and ``--no-compiled`` leave it out.

Repeats are interleaved: repeat r times every candidate once, in an order rotated
by r, so that drifts of a shared machine hit all candidates alike. The table gives
the median per candidate and its ratio to the median of ``AdamW fused`` measured
in the same repeats; a summary line per set says whether the bar is met.

``--clock cpu`` measures the thread's CPU time (``time.thread_time``) with one
intra-op thread: on a machine shared with other jobs, wall time mostly measures
the other jobs, while the CPU time of a memory-bound step barely moves. The
default (``wall``) is the number a user sees on a quiet machine.

Parameter sets:

- ``8x1024^2``: eight 1024x1024 matrices (8.4 M elements): large, memory-bound;
- ``2000x32^2``: two thousand 32x32 matrices (2 M elements): per-tensor overhead;
- ``vit-b``: ViT-B/16 at 224 px (152 tensors, 86.6 M elements).
- ``--tiny``: one small set, 3 repeats, one thread (CI smoke run: the script works; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch

from dualopt.torch._kernels import DEFAULT_POLICY
from dualopt.torch import _native as _torch_native
from dualopt.torch._native import native_status
from dualopt.torch import DualOpt

#: Issue 21: the skip rows against the guarded route, the propagate rows against AdamW fused.
BAR = {"DualOpt scratch": 1.0, "DualOpt finetune": 1.15}
GUARDED = "AdamW fused, guarded (GradScaler route)"
COMPILED = "DualOpt finetune compiled"
COMPILE_MAX_TENSORS = 500


def vit_b_shapes() -> list[tuple[int, ...]]:
    """ViT-B/16 at 224 px: patch embedding, class token, positions, 12 blocks, final norm, 1000-way head."""
    d, mlp = 768, 3072
    shapes: list[tuple[int, ...]] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,),  # norm1
                   (3 * d, d), (3 * d,),  # qkv
                   (d, d), (d,),  # proj
                   (d,), (d,),  # norm2
                   (mlp, d), (mlp,), (d, mlp), (d,)]  # mlp
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "8x1024^2": lambda: [(1024, 1024)] * 8,
    "2000x32^2": lambda: [(32, 32)] * 2000,
    "vit-b": vit_b_shapes,
}
TINY_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "tiny (4x64^2 + 40x8^2)": lambda: [(64, 64)] * 4 + [(8, 8)] * 40,
}


NO_KERNEL = "DualOpt finetune, no C kernel"


class WithoutKernel:
    """Steps ``opt`` as if the C kernel had not loaded (the fallback every user without a compiler gets).

    The optimizer decides per plan whether the kernel takes its tensors, from
    whether the library is loaded when the plan is built or the learning rate
    changes; hiding the library during each of its steps keeps the decision off.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        lib = _torch_native._state["lib"]
        _torch_native._state["lib"] = None
        try:
            self.opt.step()
        finally:
            _torch_native._state["lib"] = lib


class Guarded:
    """GradScaler's route without a scale: one multi-tensor NaN/Inf check, then fused AdamW with ``found_inf``.

    This is what ``torch.amp.GradScaler.step`` does for an optimizer with
    ``_step_supports_amp_scaling`` (fused AdamW), with the scale left out: the
    flag stays on the device and the kernel skips by itself.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        device = opt.param_groups[0]["params"][0].device
        self.one = torch.ones((), device=device)
        self.device = device

    def step(self) -> None:
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        found = torch.zeros((), device=self.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.one)
        self.opt.found_inf = found  # type: ignore[attr-defined]
        self.opt.grad_scale = None  # type: ignore[attr-defined]
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf, self.opt.grad_scale  # type: ignore[attr-defined]


class Compiled:
    """``torch.compile(opt.step, fullgraph=True)``: a graph break would raise, not fall back."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.step = torch.compile(opt.step, fullgraph=True)


def candidates(params: list[torch.Tensor], with_reference: bool,
               with_compiled: bool) -> dict[str, torch.optim.Optimizer]:
    lr = 1e-4
    out: dict[str, torch.optim.Optimizer] = {
        "AdamW fused": torch.optim.AdamW(params, lr=lr, fused=True),
        GUARDED: Guarded(torch.optim.AdamW(params, lr=lr, fused=True)),  # type: ignore[dict-item]
        "AdamW for-loop": torch.optim.AdamW(params, lr=lr, foreach=False),
        "DualOpt scratch": DualOpt(params, lr=lr, paradigm="scratch"),
        "DualOpt scratch propagate": DualOpt(params, lr=lr, paradigm="scratch", nonfinite="propagate"),
        "DualOpt finetune": DualOpt(params, lr=lr, paradigm="finetune"),
        "DualOpt finetune propagate": DualOpt(params, lr=lr, paradigm="finetune", nonfinite="propagate"),
    }
    if native_status()["enabled"]:
        out[NO_KERNEL] = WithoutKernel(DualOpt(params, lr=lr, paradigm="finetune"))  # type: ignore[assignment]
    if with_reference:
        out["DualOpt finetune reference loop"] = DualOpt(params, lr=lr, paradigm="finetune", foreach=False)
    if with_compiled:
        out[COMPILED] = Compiled(DualOpt(params, lr=lr, paradigm="finetune"))  # type: ignore[assignment]
    return out


def measure(name: str, shapes: list[tuple[int, ...]], repeats: int, with_reference: bool,
            clock: Callable[[], float], with_compiled: bool = False,
            device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Print one set's table; return each candidate's ratio to AdamW fused."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    if with_compiled and len(params) > COMPILE_MAX_TENSORS:
        print(f"\n({name}: no compiled row, {len(params)} tensors > COMPILE_MAX_TENSORS = {COMPILE_MAX_TENSORS})")
        with_compiled = False
    opts = candidates(params, with_reference, with_compiled)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for opt in opts.values():  # warm-up: allocates state, first-touch pages, compiles
        for _ in range(3 if isinstance(opt, Compiled) else 1):
            opt.step()
    sync()
    times: dict[str, list[float]] = {k: [] for k in opts}
    keys = list(opts)
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            if k.endswith("reference loop") and r % 3:
                continue  # the reference loop is slow; a third of the repeats suffice for its median
            t0 = clock()
            opts[k].step()
            sync()  # a GPU step is timed to its end (one wait per step, outside the optimizers)
            times[k].append(clock() - t0)
    base = statistics.median(times["AdamW fused"])
    numel = sum(p.numel() for p in params)
    guarded = statistics.median(times[GUARDED])
    print(f"\n{name}: {len(params)} tensors, {numel / 1e6:.2f} M float32 elements, "
          f"{repeats} interleaved repeats, {torch.get_num_threads()} threads, {device.type}")
    print(f"  {'optimizer':40s} {'median ms':>10s} {'vs AdamW fused':>15s} {'vs guarded':>11s}")
    ratios = {}
    for k in keys:
        med = statistics.median(times[k])
        ratios[k] = med / base
        print(f"  {k:40s} {med * 1e3:10.2f} {ratios[k]:14.2f}x {med / guarded:10.2f}x")

    def verdict(ratio: float, bar: float) -> str:
        return f"{ratio:.2f}x (bar {bar:.2f}x: {'met' if ratio <= bar else 'NOT met'})"

    skip = ", ".join(f"{k.split()[1]} {verdict(ratios[k] * base / guarded, bar)}" for k, bar in BAR.items())
    prop = ", ".join(f"{k.split()[1]} {verdict(ratios[k + ' propagate'], bar)}" for k, bar in BAR.items())
    print(f"  skip vs guarded route: {skip}")
    print(f"  propagate vs AdamW fused: {prop}")
    print(f"  (the guarded route itself: {guarded / base:.2f}x AdamW fused)")
    if COMPILED in ratios:
        eager = statistics.median(times["DualOpt finetune"])
        print(f"  compiled finetune step: {statistics.median(times[COMPILED]) / eager:.2f}x the eager default "
              "(C kernel where it is in use)" + (f", {statistics.median(times[COMPILED]) / statistics.median(times[NO_KERNEL]):.2f}x "
                                                 "the eager torch kernels" if NO_KERNEL in times else ""))
    if NO_KERNEL in ratios:
        with_c, without = statistics.median(times["DualOpt finetune"]), statistics.median(times[NO_KERNEL])
        print(f"  C kernel: finetune step {with_c * 1e3:.2f} ms with it, {without * 1e3:.2f} ms without "
              f"({(1 - with_c / without) * 100:.1f} % less time, {without / with_c:.2f}x the speed)")
    del opts, params
    gc.collect()
    return ratios


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {list(SETS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: time.thread_time with one thread (for a shared machine)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference loop")
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile'd step (compiling is slow)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="one small set, 3 repeats: a smoke run")
    args = ap.parse_args(argv)
    if args.clock == "cpu":
        if args.threads not in (None, 1):
            ap.error("--clock cpu measures one thread's CPU time: use --threads 1 or leave it out")
        args.threads = 1
    if args.tiny and args.threads is None:
        args.threads = 1  # a smoke run: a thread pool only adds start-up noise at these sizes
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    sets = TINY_SETS if args.tiny else {n: SETS[n] for n in args.sets.split(",")}
    repeats = 3 if args.tiny else args.repeats
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here")
    print(f"torch {torch.__version__}, {device.type}, clock {args.clock}; bars (issue 21), step() only: skip vs the "
          "guarded route and propagate vs AdamW(fused=True), scratch <= 1.0x, finetune <= 1.15x")
    status = native_status()
    print(f"C kernel (Adam finetune tensors of {DEFAULT_POLICY.native_min_numel}+ elements): "
          f"{'in use' if status['enabled'] else 'NOT in use'} ({status['reason']})")
    for name, shapes in sets.items():
        measure(name, shapes(), repeats, not args.no_reference, clock,
                with_compiled=not (args.tiny or args.no_compiled), device=device)


if __name__ == "__main__":
    main()
