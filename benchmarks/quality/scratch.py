"""From scratch: AdamW against DualOpt's scratch paradigm across a weight-decay sweep.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.quality.scratch             # full: 3 seeds x (6 lambdas x 2 + Adam), ~6 min on 2 idle cores
    .venv/bin/python -m benchmarks.quality.scratch --tiny      # seconds (CI smoke run)

The same ``CharMLP`` is trained from a fresh initialisation on the downstream
corpus (stdlib Python source, ~140 kB: small enough to overfit, so weight decay
matters). LPWD's claim is robustness to lambda: the figure plots final
downstream *test* accuracy (and loss) against lambda for both optimizers, with
lambda = 0 (plain Adam, where both coincide) as the reference line. The best
lambda of each optimizer is selected on validation and reported on test. Note that at the
same lambda DualOpt decays *less* on average than AdamW (layer l of L decays at
``lambda*(l+1)/L``; only the head gets the full lambda), so compare the curves'
shapes and their best points, not values at equal lambda.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
from . import data
from .methods import Method
from .report import plot_scratch, scratch_table
from .runner import FULL, TINY, default_workers, run_jobs, scratch_job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="From-scratch weight-decay sweep (char-level LM).")
    ap.add_argument("--tiny", action="store_true", help="tiny model and few steps (CI smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (0: in-process)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "results" / "quality")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    workers = args.workers if args.workers is not None else (0 if args.tiny else default_workers())
    out = args.out / ("tiny" if args.tiny else "")
    t0 = time.perf_counter()
    print(f"config: {json.dumps(asdict(cfg))}")
    print(f"data: {json.dumps(data.describe())}")
    jobs = [(scratch_job, (cfg, Method(kind, lam), s)) for s in cfg.seeds for lam in cfg.weight_decays
            for kind in ("adamw_scratch", "dualopt_scratch")]
    jobs += [(scratch_job, (cfg, Method("adamw_scratch", 0.0), s)) for s in cfg.seeds]  # no decay: plain Adam
    runs = run_jobs(jobs, workers)
    table = scratch_table(runs)
    print("\n## From scratch: final downstream accuracy and loss against weight decay\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scratch.md").write_text(table + "\n")
    (out / "scratch.json").write_text(json.dumps({"config": asdict(cfg), "data": data.describe(), "runs": runs},
                                                 indent=1))
    plot_scratch(runs, out / "scratch.png")
    print(f"\nwrote {out / 'scratch.json'}, {out / 'scratch.md'}, {out / 'scratch.png'}")
    print(f"wall time {time.perf_counter() - t0:.1f} s ({workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
