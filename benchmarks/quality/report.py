"""Markdown tables and matplotlib (Agg) figures for the quality benchmarks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .runner import mean_std

__all__ = ["group_runs", "finetune_table", "scratch_table", "plot_finetune", "plot_scratch"]


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["label"]].append(r)
    return dict(out)


def _ms(xs, digits: int = 3) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def finetune_table(runs: list[dict], pretrained: list[dict]) -> str:
    up0 = [p["up_val"] for p in pretrained]
    zero = [p["down_val_zero_shot"] for p in pretrained]
    lines = [
        f"Pretrained model (upstream AdamW, n={len(pretrained)} seeds): upstream val loss {_ms(up0)}, "
        f"downstream val loss with the upstream head (zero-shot) {_ms(zero)}.\n",
        "| method | downstream val loss (final) | best during training | downstream train loss | "
        "upstream val loss after | upstream increase (forgetting) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_seed_up0 = {p["seed"]: p["up_val"] for p in pretrained}
    for label, rs in group_runs(runs).items():
        final = [r["curve"][-1] for r in rs]
        best = [min(c["down_val"] for c in r["curve"]) for r in rs]
        lines.append(
            f"| {label} | {_ms(f['down_val'] for f in final)} | {_ms(best)} | "
            f"{_ms(f['down_train'] for f in final)} | {_ms(f['up_val'] for f in final)} | "
            f"{_ms(f['up_val'] - by_seed_up0[r['seed']] for f, r in zip(final, rs))} |")
    lines.append("")
    lines.append("Losses are cross-entropy in nats per character (mean ± sample std over seeds).")
    return "\n".join(lines)


def scratch_table(runs: list[dict]) -> str:
    table: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        table[(r["method"]["kind"], r["method"]["value"])].append(r)
    kinds = sorted({k for k, _ in table}, key=lambda k: 0 if k.startswith("adamw") else 1)
    lams = sorted({v for _, v in table})
    names = {"adamw_scratch": "AdamW", "dualopt_scratch": "DualOpt scratch"}
    lines = ["| weight decay λ | " + " | ".join(f"{names[k]} final | {names[k]} best" for k in kinds) + " |",
             "|---:|" + "---:|---:|" * len(kinds)]
    for lam in lams:
        cells = []
        for k in kinds:
            rs = table[(k, lam)]
            cells.append(_ms(r["curve"][-1]["down_val"] for r in rs))
            cells.append(_ms(min(c["down_val"] for c in r["curve"]) for r in rs))
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    lines.append("")
    summary = []
    for k in kinds:
        finals = {lam: mean_std(r["curve"][-1]["down_val"] for r in table[(k, lam)])[0] for lam in lams}
        best = min(finals.values())
        spread = max(finals.values()) - best
        near = [lam for lam, v in finals.items() if v <= best + 0.02]
        summary.append(f"{names[k]}: best final {best:.3f} at λ={min(finals, key=finals.get):g}; "
                       f"worst-minus-best over the sweep {spread:.3f}; λ within 0.02 of its best: "
                       f"{', '.join(f'{x:g}' for x in near)}")
    lines.append("Downstream validation loss (nats/char, mean ± std over seeds). " + "; ".join(summary) + ".")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_finetune(runs: list[dict], pretrained: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    groups = group_runs(runs)
    for i, (label, rs) in enumerate(groups.items()):
        color = f"C{i % 10}"
        dx = mean_std(r["curve"][-1]["down_val"] for r in rs)
        uy = mean_std(r["curve"][-1]["up_val"] for r in rs)
        marker = "s" if label.startswith("DualOpt") else "o"
        ax1.errorbar(dx[0], uy[0], xerr=dx[1], yerr=uy[1], fmt=marker, color=color, label=label, capsize=3)
        steps = [c["step"] for c in rs[0]["curve"]]
        mean_curve = [mean_std(r["curve"][j]["down_val"] for r in rs)[0] for j in range(len(steps))]
        ax2.plot(steps, mean_curve, marker=marker, color=color, label=label)
    up0 = mean_std(p["up_val"] for p in pretrained)[0]
    ax1.axhline(up0, color="gray", ls="--", lw=1, label="upstream loss before fine-tuning")
    ax1.set_xlabel("downstream val loss after fine-tuning (nats/char, lower is better)")
    ax1.set_ylabel("upstream val loss after fine-tuning (lower = less forgetting)")
    ax1.set_title("Fine-tuning trade-off (mean ± std over seeds)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("downstream val loss (mean over seeds)")
    ax2.set_title("Downstream validation loss during fine-tuning")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scratch(runs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    table: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        table[r["method"]["kind"]][r["method"]["value"]].append(r)
    names = {"adamw_scratch": "AdamW", "dualopt_scratch": "DualOpt scratch (real-time layer-wise decay)"}
    for i, (kind, by_lam) in enumerate(sorted(table.items())):
        lams = sorted(by_lam)
        final = [mean_std(r["curve"][-1]["down_val"] for r in by_lam[l]) for l in lams]
        best = [mean_std(min(c["down_val"] for c in r["curve"]) for r in by_lam[l])[0] for l in lams]
        ax.errorbar(lams, [m for m, _ in final], yerr=[s for _, s in final], marker="o", color=f"C{i}",
                    capsize=3, label=f"{names[kind]}: final")
        ax.plot(lams, best, ls=":", marker=".", color=f"C{i}", label=f"{names[kind]}: best during training")
    ax.set_xscale("log")
    ax.set_xlabel("weight decay λ")
    ax.set_ylabel("downstream val loss (nats/char, mean ± std)")
    ax.set_title("From scratch: sensitivity to weight decay")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
