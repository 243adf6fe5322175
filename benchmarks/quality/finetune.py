"""Fine-tuning and forgetting: pretrain on English prose, fine-tune on Python source.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.quality.finetune            # full: 3 seeds, ~9 min on 2 idle cores
    .venv/bin/python -m benchmarks.quality.finetune --tiny     # seconds (CI smoke run)

Protocol (see ``benchmarks/README.md``):

1. Per seed, pretrain ``CharMLP`` on the upstream corpus (``pydoc_data.topics``)
   with AdamW. The weights are cached under the output folder, keyed by a digest
   of everything they depend on.
2. For each method, load the seed's pretrained weights, re-initialise the
   output head (new task: a new head, as in OLOR's and L2-SP's transfer
   setting; the vocabulary is shared, so the upstream head is kept aside,
   frozen), and train on the downstream corpus (stdlib Python source).
3. Each family (AdamW, AdamW + L2-SP, linear probe, DualOpt finetune) has a
   small sweep of its own knob; the configuration with the lowest mean
   downstream *validation* loss (final step) is selected per family, and its
   downstream *test* loss and accuracy are reported (validation and test are
   different source files). Early stopping is reported the same way: the
   evaluation step with the lowest validation loss, per run, scored on test.
4. *Upstream retention*: the upstream held-out loss of the fine-tuned backbone
   read out through the kept (frozen) upstream head, against the same number
   before fine-tuning, also as "% of the upstream skill retained" relative to
   a no-context (unigram) model; and through a *refitted* upstream head
   (what the backbone still knows, not only what the network still does).

Every method sees the same head initialisation and the same batches for a
given seed (paired comparison; the tables give paired differences to AdamW).
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
from .report import finetune_table, plot_finetune
from .runner import FULL, TINY, default_workers, finetune_job, pretrain_job, run_jobs


def methods(cfg) -> list[Method]:
    """Every fine-tuning run of one seed: each family's sweep, the rounded-anchor emulations, the reference."""
    return ([Method("adamw")] + [Method("l2sp", a) for a in cfg.l2sp_alphas]
            + [Method("probe", lr=lr) for lr in cfg.probe_lrs]
            + [Method("dualopt", f) for f in cfg.rollback_fractions]
            + [Method("dualopt", f, "module") for f in cfg.module_layer_fractions]
            + [Method("dualopt", cfg.anchor_format_fraction, anchor=fmt) for fmt in cfg.anchor_formats]
            + [Method("adamw_random")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tuning and forgetting benchmark (char-level LM).")
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
    pretrained = run_jobs([(pretrain_job, (cfg, s, out / "cache")) for s in cfg.seeds], workers)
    for p in pretrained:
        print(f"pretrained seed {p['seed']}: upstream val {p['up_val']:.4f}"
              f"{' (cached)' if p['cached'] else ''}")
    paths = {p["seed"]: p["path"] for p in pretrained}
    jobs = [(finetune_job, (cfg, m, s, paths[s])) for s in cfg.seeds for m in methods(cfg)]
    runs = run_jobs(jobs, workers)
    table = finetune_table(runs, pretrained)
    print("\n## Fine-tuning: downstream quality and upstream retention\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.md").write_text(table + "\n")
    (out / "finetune.json").write_text(json.dumps({"config": asdict(cfg), "data": data.describe(),
                                                   "pretrained": pretrained, "runs": runs}, indent=1))
    plot_finetune(runs, pretrained, out / "finetune.png")
    print(f"\nwrote {out / 'finetune.json'}, {out / 'finetune.md'}, {out / 'finetune.png'}")
    print(f"wall time {time.perf_counter() - t0:.1f} s ({workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
