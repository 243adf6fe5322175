"""Cost of one optimizer step: DualOpt (torch) against torch.optim.AdamW, measured in one process.

    python benchmarks/step_cost_torch.py [--repeats 15] [--sets 8x1024^2,2000x32^2,vit-b] [--threads N]

For every parameter set, every candidate optimizer owns its state but all share
the same parameters and gradients. Repeats are interleaved (round r times every
candidate once, in a rotated order) so that drifts of a shared machine hit all
candidates alike; the table prints medians and the ratio to
``torch.optim.AdamW(fused=True)``, the bar (DualOpt scratch <= 1.0x, finetune
<= 1.2x). ``nonfinite="skip"`` (the default) pays one extra read of the
gradients for its NaN/Inf check; ``nonfinite="propagate"`` shows the cost
without it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch

from dualopt.torch import DualOpt


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


def candidates(params: list[torch.Tensor], with_reference: bool) -> dict[str, torch.optim.Optimizer]:
    lr = 1e-4
    out: dict[str, torch.optim.Optimizer] = {
        "AdamW fused": torch.optim.AdamW(params, lr=lr, fused=True),
        "AdamW for-loop": torch.optim.AdamW(params, lr=lr, foreach=False),
        "DualOpt scratch": DualOpt(params, lr=lr, paradigm="scratch"),
        "DualOpt scratch propagate": DualOpt(params, lr=lr, paradigm="scratch", nonfinite="propagate"),
        "DualOpt finetune": DualOpt(params, lr=lr, paradigm="finetune"),
        "DualOpt finetune propagate": DualOpt(params, lr=lr, paradigm="finetune", nonfinite="propagate"),
    }
    if with_reference:
        out["DualOpt finetune reference loop"] = DualOpt(params, lr=lr, paradigm="finetune", foreach=False)
    return out


def measure(name: str, shapes: list[tuple[int, ...]], repeats: int, with_reference: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opts = candidates(params, with_reference)
    for opt in opts.values():  # warm-up: allocates state, first-touch pages
        opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    keys = list(opts)
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            if k.endswith("reference loop") and r % 3:
                continue  # the reference loop is slow; a third of the repeats suffice for its median
            t0 = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["AdamW fused"])
    numel = sum(p.numel() for p in params)
    print(f"\n{name}: {len(params)} tensors, {numel / 1e6:.2f} M float32 elements, "
          f"{repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print(f"  {'optimizer':34s} {'median ms':>10s} {'vs AdamW fused':>15s}")
    for k in keys:
        med = statistics.median(times[k])
        print(f"  {k:34s} {med * 1e3:10.2f} {med / base:14.2f}x")
    del opts, params
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {list(SETS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, bar: DualOpt scratch <= 1.0x and finetune <= 1.2x AdamW(fused=True)")
    for name in args.sets.split(","):
        measure(name, SETS[name](), args.repeats, not args.no_reference)


if __name__ == "__main__":
    main()
