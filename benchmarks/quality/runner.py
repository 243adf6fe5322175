"""Configurations, jobs and the worker pool shared by ``finetune.py`` and ``scratch.py``.

Each job (one pretraining run, or one method x seed) runs in a worker process
with ``torch.set_num_threads(1)``: single-threaded runs are deterministic and
two of them fill a 2-core machine better than one two-threaded run (small
matmuls scale poorly, and two-thread runs stall badly when other processes
share the cores).
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from . import data
from .methods import Method, build
from .model import CharMLP, ModelConfig
from .train import evaluate, train, windows

__all__ = ["Config", "FULL", "TINY", "run_jobs", "pretrain_job", "finetune_job", "scratch_job", "mean_std",
           "unigram_loss", "refit_upstream"]


@dataclass(frozen=True)
class Config:
    context: int = 32
    embed: int = 32
    hidden: int = 512
    depth: int = 3
    batch_size: int = 128
    pretrain_steps: int = 2000
    pretrain_lr: float = 2e-3
    pretrain_weight_decay: float = 1e-2
    finetune_steps: int = 1000
    finetune_lr: float = 1e-3
    scratch_steps: int = 1000
    scratch_lr: float = 2e-3
    eval_every: int = 250
    eval_positions: int = 8192
    refit_positions: int = 16384  # upstream-train positions the refitted upstream head is trained on
    refit_steps: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    # Each family's sweep (half-decade steps; L2-SP and DualOpt get the same number of points, see README)
    l2sp_alphas: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    probe_lrs: tuple[float, ...] = (0.001, 0.003, 0.01)
    rollback_fractions: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    module_layer_fractions: tuple[float, ...] = (0.03,)  # a variant, shown but not selected
    anchor_formats: tuple[str, ...] = ("bfloat16",)
    anchor_format_fraction: float = 0.1  # the lr*k_max at which the rounded anchor is tried (a strong pull)
    weight_decays: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # plus lambda = 0 (Adam) as reference

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=data.VOCAB_SIZE, context=self.context, embed=self.embed,
                           hidden=self.hidden, depth=self.depth)

    def pretrain_key(self, seed: int) -> str:
        """Digest of everything the pretrained weights (and their recorded scores) depend on (cache key)."""
        keys = ("context", "embed", "hidden", "depth", "batch_size", "pretrain_steps", "pretrain_lr",
                "pretrain_weight_decay", "eval_positions", "refit_positions", "refit_steps")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"seed": seed, "torch": torch.__version__,
                                                                  "data": data.describe(), "format": 2})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


FULL = Config()
TINY = Config(context=8, embed=8, hidden=32, depth=3, batch_size=32, pretrain_steps=40, finetune_steps=30,
              scratch_steps=30, eval_every=10, eval_positions=256, refit_positions=512, refit_steps=20,
              seeds=(0, 1), l2sp_alphas=(0.1,), probe_lrs=(0.001,), rollback_fractions=(0.01, 0.1),
              module_layer_fractions=(0.1,), anchor_formats=("bfloat16",), weight_decays=(0.1, 10.0))


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


_STREAMS: dict[str, dict[str, torch.Tensor]] = {}


def streams() -> dict[str, dict[str, torch.Tensor]]:
    if not _STREAMS:
        for name, corpus in (("up", data.upstream()), ("down", data.downstream())):
            _STREAMS[name] = {k: torch.from_numpy(getattr(corpus, k)) for k in ("train", "val", "test")
                              if getattr(corpus, k) is not None}
    return _STREAMS


def unigram_loss(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy on ``val`` of character frequencies counted on ``train`` (add-one smoothed): "no skill"."""
    counts = torch.bincount(train, minlength=data.VOCAB_SIZE).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


# ----------------------------------------------------------------------------- jobs
def refit_upstream(model: CharMLP, up_head: torch.nn.Module, cfg: Config, seed: int) -> dict[str, float]:
    """Upstream held-out score of the backbone with a *refitted* upstream head.

    Starting from the kept upstream head, a linear head is trained for
    ``refit_steps`` Adam steps on the backbone's (frozen) features at
    ``refit_positions`` upstream-training positions. It measures what the
    backbone still *knows* about the upstream task, as opposed to the kept
    head, which measures what the network still *does*. Applied to the
    pretrained backbone too, so the two are compared like with like.
    """
    S, ctx = streams()["up"], cfg.context
    n = min(cfg.refit_positions, S["train"].numel() - ctx)
    pos = torch.linspace(ctx, S["train"].numel() - 1, n).round().long()
    with torch.no_grad():
        x, y = windows(S["train"], pos, ctx)
        feats = torch.cat([model.features(x[k:k + 2048]) for k in range(0, n, 2048)])
    head = copy.deepcopy(up_head).requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(4000 + seed)
    for _ in range(cfg.refit_steps):
        idx = torch.randint(0, n, (min(1024, n),), generator=gen)
        loss = torch.nn.functional.cross_entropy(head(feats[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    return evaluate(model, S["val"], ctx, cfg.eval_positions, head=head)


def pretrain_job(cfg: Config, seed: int, cache: Path) -> dict:
    """Train on the upstream task with AdamW; cache the weights (model + upstream head) by config digest."""
    path = cache / f"pretrained_seed{seed}_{cfg.pretrain_key(seed)}.pt"
    S = streams()
    if path.exists():
        blob = torch.load(path)
        return {"seed": seed, "path": str(path), "cached": True, **blob["info"]}
    torch.manual_seed(seed)
    model = CharMLP(cfg.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay)
    run = train(model, opt, S["up"]["train"], steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                generator=torch.Generator().manual_seed(seed))
    up = evaluate(model, S["up"]["val"], cfg.context, cfg.eval_positions)
    refit = refit_upstream(model, model.head, cfg, seed)
    zero = {k: evaluate(model, S["down"][k], cfg.context, cfg.eval_positions) for k in ("val", "test")}
    # The same model with its weights rounded to 2-byte formats: how far a lower-precision anchor is from
    # the true pretrained weights, in function space (upstream held-out loss).
    rounded = {}
    for fmt in ("bfloat16", "float16"):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(getattr(torch, fmt)).float())
        rounded[fmt] = evaluate(m, S["up"]["val"], cfg.context, cfg.eval_positions)["loss"]
    info = {"up_val": up["loss"], "up_val_acc": up["acc"], "up_val_refit": refit["loss"],
            "up_val_refit_acc": refit["acc"],
            "up_train": evaluate(model, S["up"]["train"], cfg.context, cfg.eval_positions)["loss"],
            "up_unigram": unigram_loss(S["up"]["train"], S["up"]["val"]),
            "down_val_zero_shot": zero["val"]["loss"], "down_test_zero_shot": zero["test"]["loss"],
            "up_val_rounded": rounded, "seconds": run["seconds"]}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return {"seed": seed, "path": str(path), "cached": False, **info}


def _evaluator(model: CharMLP, cfg: Config, up_head: torch.nn.Module | None, seed: int):
    """Scores at each evaluation: downstream val and test (loss, accuracy), upstream retention."""
    S = streams()

    def on_eval(step: int, final: bool) -> dict:
        out = {}
        for split in ("val", "test"):
            r = evaluate(model, S["down"][split], cfg.context, cfg.eval_positions)
            out[f"down_{split}"], out[f"down_{split}_acc"] = r["loss"], r["acc"]
        if up_head is not None:
            r = evaluate(model, S["up"]["val"], cfg.context, cfg.eval_positions, head=up_head)
            out["up_val"], out["up_val_acc"] = r["loss"], r["acc"]
        if final:
            out["down_train"] = evaluate(model, S["down"]["train"], cfg.context, cfg.eval_positions)["loss"]
            if up_head is not None:
                r = refit_upstream(model, up_head, cfg, seed)
                out["up_val_refit"], out["up_val_refit_acc"] = r["loss"], r["acc"]
        return out

    return on_eval


def finetune_job(cfg: Config, method: Method, seed: int, pretrained: str) -> dict:
    """Fine-tune the seed's pretrained model on the downstream task with a re-initialised head.

    Upstream retention is scored with the *upstream* head (kept from
    pretraining, frozen) on the fine-tuned backbone, and with a refitted
    upstream head (:func:`refit_upstream`). ``adamw_random`` skips the
    pretrained weights (a no-pretraining reference; no retention scores).
    """
    model = CharMLP(cfg.model_config())
    up_head = None
    if method.kind == "adamw_random":
        torch.manual_seed(3000 + seed)
        model = CharMLP(cfg.model_config())
    else:
        model.load_state_dict(torch.load(pretrained)["state_dict"])
        up_head = copy.deepcopy(model.head).requires_grad_(False)
    model.reset_head(torch.Generator().manual_seed(1000 + seed))
    opt, penalty = build(method, model, cfg.finetune_lr)
    run = train(model, opt, streams()["down"]["train"], steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                generator=torch.Generator().manual_seed(2000 + seed), penalty=penalty,
                on_eval=_evaluator(model, cfg, up_head, seed), eval_every=cfg.eval_every)
    return {"method": asdict(method), "label": method.label, "family": method.family, "seed": seed, **run}


def scratch_job(cfg: Config, method: Method, seed: int) -> dict:
    """Train from a fresh initialisation on the downstream task."""
    torch.manual_seed(3000 + seed)
    model = CharMLP(cfg.model_config())
    opt, _ = build(method, model, cfg.scratch_lr)
    run = train(model, opt, streams()["down"]["train"], steps=cfg.scratch_steps, batch_size=cfg.batch_size,
                generator=torch.Generator().manual_seed(2000 + seed),
                on_eval=_evaluator(model, cfg, None, seed), eval_every=cfg.eval_every)
    return {"method": asdict(method), "label": method.label, "seed": seed, **run}


# ----------------------------------------------------------------------------- pool
def _init_worker() -> None:
    torch.set_num_threads(1)


def _call(job: tuple) -> Any:
    fn, args = job
    t = time.perf_counter()
    out = fn(*args)
    if isinstance(out, dict):
        out["job_seconds"] = time.perf_counter() - t
    return out


def _progress(k: int, n: int, out: Any) -> None:
    if isinstance(out, dict) and "curve" in out:
        last = out["curve"][-1]
        print(f"  [{k}/{n}] {out['label']} seed {out['seed']}: downstream val {last['down_val']:.4f}"
              f" (acc {last['down_val_acc']:.3f})"
              + (f", upstream val {last['up_val']:.4f}" if "up_val" in last else "")
              + f" ({out['job_seconds']:.0f} s)", flush=True)


def run_jobs(jobs: list[tuple], workers: int) -> list[Any]:
    """Run ``(fn, args)`` jobs on ``workers`` processes (0: in this process); results in submission order."""
    results = []
    if workers <= 0:
        _init_worker()
        for k, job in enumerate(jobs, 1):
            results.append(_call(job))
            _progress(k, len(jobs), results[-1])
        return results
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for k, out in enumerate(pool.imap(_call, jobs, chunksize=1), 1):
            results.append(out)
            _progress(k, len(jobs), out)
    return results


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
