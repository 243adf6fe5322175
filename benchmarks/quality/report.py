"""Markdown tables and matplotlib (Agg) figures for the quality benchmarks.

Selection rule (both benchmarks): a configuration is chosen on downstream
*validation* loss at the final step, averaged over seeds; the tables report its
downstream *test* scores. Early stopping picks, per run, the evaluation step
with the lowest validation loss and reports test at that step. Nothing is
chosen on test, and nothing is chosen on the upstream scores.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .methods import FAMILIES
from .runner import mean_std

__all__ = ["group_runs", "select", "finetune_table", "scratch_table", "plot_finetune", "plot_scratch"]


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by label (one entry per seed), in submission order."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["label"]].append(r)
    return dict(out)


def _ms(xs: Iterable[float], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    m, s = mean_std(x * scale for x in xs)
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if sign else f"{m:.{digits}f} ± {s:.{digits}f}"


def _final(rs: list[dict], key: str) -> list[float]:
    return [r["curve"][-1][key] for r in rs]


def _early(r: dict, key: str = "down_test") -> float:
    """``key`` at the evaluation step with the lowest downstream validation loss (early stopping)."""
    c = min(r["curve"], key=lambda c: c["down_val"])
    return c[key]


def select(groups: dict[str, list[dict]], labels: Iterable[str]) -> str:
    """The label with the lowest mean final downstream validation loss."""
    return min(labels, key=lambda lab: mean_std(_final(groups[lab], "down_val"))[0])


def _paired(rs: list[dict], ref: list[dict], fn) -> list[float]:
    """Per-seed differences ``fn(run) - fn(reference run of the same seed)``."""
    by_seed = {r["seed"]: r for r in ref}
    return [fn(r) - fn(by_seed[r["seed"]]) for r in rs]


def _retained(r: dict, pre: dict) -> float:
    """% of the upstream skill above a no-context (unigram) model that survives fine-tuning (kept head)."""
    return 100 * (pre["up_unigram"] - r["curve"][-1]["up_val"]) / (pre["up_unigram"] - pre["up_val"])


def finetune_selection(runs: list[dict]) -> dict[str, str]:
    """Family -> selected label."""
    groups = group_runs(runs)
    out = {}
    for fam in FAMILIES:
        labels = [lab for lab, rs in groups.items() if rs[0].get("family") == fam]
        if labels:
            out[fam] = select(groups, labels)
    return out


def finetune_table(runs: list[dict], pretrained: list[dict]) -> str:
    groups = group_runs(runs)
    pre = {p["seed"]: p for p in pretrained}
    chosen = finetune_selection(runs)
    adamw = groups[chosen["adamw"]] if "adamw" in chosen else None
    n = len(pretrained)
    lines = [
        f"Pretrained model (AdamW on the upstream prose, n={n} seeds): upstream held-out loss "
        f"{_ms(p['up_val'] for p in pretrained)} (accuracy {_ms([p['up_val_acc'] for p in pretrained], 1, 100)} %); "
        f"a no-context unigram model scores {_ms(p['up_unigram'] for p in pretrained)}. Zero-shot downstream test "
        f"loss with the upstream head: {_ms(p['down_test_zero_shot'] for p in pretrained)}.\n",
        "**Selected configurations** (per family, lowest mean downstream *validation* loss; scores on downstream "
        "*test*; upstream retention on held-out upstream topics):\n",
        "| method | selected setting | downstream test loss | test accuracy % | Δ test loss vs AdamW (paired) "
        "| test loss, early-stopped on val | upstream loss after (kept head) | upstream skill retained % "
        "| upstream loss, refitted head |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, label: str, setting: str) -> str:
        rs = groups[label]
        delta = _ms(_paired(rs, adamw, lambda r: r["curve"][-1]["down_test"]), sign=True) if adamw else ""
        if label == chosen.get("adamw"):
            delta = "0 (reference)"
        has_up = "up_val" in rs[0]["curve"][-1]
        up = [_ms(_final(rs, "up_val")), _ms([_retained(r, pre[r["seed"]]) for r in rs], 1),
              _ms(_final(rs, "up_val_refit"))] if has_up else ["n/a"] * 3
        return (f"| {name} | {setting} | {_ms(_final(rs, 'down_test'))} | {_ms(_final(rs, 'down_test_acc'), 1, 100)} "
                f"| {delta} | {_ms(_early(r) for r in rs)} | " + " | ".join(up) + " |")

    for fam, label in chosen.items():
        rs = groups[label]
        n_cfg = sum(1 for g in groups.values() if g[0].get("family") == fam)
        setting = f"{_setting(rs[0])} (of {n_cfg})" if n_cfg > 1 else "-"
        lines.append(row(FAMILIES[fam], label, setting))
    for label, rs in groups.items():
        if rs[0]["method"]["kind"] == "adamw_random":
            lines.append(row("Reference: AdamW from random init (no pretraining)", label, "-"))
    pre_refit = _ms(p["up_val_refit"] for p in pretrained)
    lines += ["", f"Before fine-tuning, the refitted upstream head scores {pre_refit} on the pretrained backbone "
              "(the kept head: the pretrained loss above). Losses are cross-entropy in nats per character; "
              "mean ± sample std over seeds; paired differences are per seed (same pretrained model, head "
              "initialisation and batches).", ""]

    lines += ["**Every configuration** (the sweep the selection saw: downstream *validation* scores):\n",
              "| method | downstream val loss (final) | val accuracy % | best val loss (at step) "
              "| downstream train loss | upstream loss after (kept head) | upstream increase | selected |",
              "|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for label, rs in groups.items():
        best_steps = sorted({min(r["curve"], key=lambda c: c["down_val"])["step"] for r in rs})
        has_up = "up_val" in rs[0]["curve"][-1]
        up = (f"{_ms(_final(rs, 'up_val'))} | "
              f"{_ms(_paired_pre(rs, pre), sign=True)}") if has_up else "n/a | n/a"
        sel = "yes" if label in chosen.values() else ""
        lines.append(f"| {label} | {_ms(_final(rs, 'down_val'))} | {_ms(_final(rs, 'down_val_acc'), 1, 100)} "
                     f"| {_ms(min(c['down_val'] for c in r['curve']) for r in rs)} "
                     f"({', '.join(map(str, best_steps))}) | {_ms(_final(rs, 'down_train'))} | {up} | {sel} |")
    lines.append("")

    lowp = [(label, rs) for label, rs in groups.items() if rs[0]["method"].get("anchor", "float32") != "float32"]
    if lowp:
        v = lowp[0][1][0]["method"]["value"]
        ref = [rs for lab, rs in groups.items() if rs[0]["method"]["kind"] == "dualopt"
               and rs[0]["method"]["value"] == v and not rs[0]["method"]["layers"]
               and rs[0]["method"].get("anchor", "float32") == "float32"]
        lines += [f"**Lower-precision anchor, emulated** (DualOpt finetune lr*k_max={v:g}; the pretrained weights "
                  "rounded to a 2-byte format are the anchor; paired with the float32 anchor run of each seed):\n",
                  "| anchor | downstream test loss | Δ vs float32 anchor | upstream loss after | Δ vs float32 anchor "
                  "| upstream loss of the pretrained model with all weights rounded (Δ) |",
                  "|---|---:|---:|---:|---:|---:|"]
        if ref:
            ref_rs = ref[0]
            lines.append(f"| float32 (DualOpt's) | {_ms(_final(ref_rs, 'down_test'), 4)} | 0 | "
                         f"{_ms(_final(ref_rs, 'up_val'), 4)} | 0 | 0 |")
            for label, rs in lowp:
                fmt = rs[0]["method"]["anchor"]
                d_round = [pre[r["seed"]]["up_val_rounded"][fmt] - pre[r["seed"]]["up_val"] for r in rs]
                lines.append(
                    f"| {fmt} | {_ms(_final(rs, 'down_test'), 4)} "
                    f"| {_ms(_paired(rs, ref_rs, lambda r: r['curve'][-1]['down_test']), 5, sign=True)} "
                    f"| {_ms(_final(rs, 'up_val'), 4)} "
                    f"| {_ms(_paired(rs, ref_rs, lambda r: r['curve'][-1]['up_val']), 5, sign=True)} "
                    f"| {_ms(d_round, 5, sign=True)} |")
        lines.append("")
    return "\n".join(lines)


def _paired_pre(rs: list[dict], pre: dict) -> list[float]:
    return [r["curve"][-1]["up_val"] - pre[r["seed"]]["up_val"] for r in rs]


def _setting(run: dict) -> str:
    from .methods import Method

    return Method(**run["method"]).setting


# ----------------------------------------------------------------------------- from scratch
def _scratch_groups(runs: list[dict]) -> tuple[dict[tuple[str, float], list[dict]], list[dict]]:
    """(kind, lambda) -> runs for lambda > 0, and the lambda = 0 (plain Adam) runs."""
    table: dict[tuple[str, float], list[dict]] = defaultdict(list)
    adam = []
    for r in runs:
        if r["method"]["value"] == 0:
            adam.append(r)
        else:
            table[(r["method"]["kind"], r["method"]["value"])].append(r)
    return table, adam


NAMES = {"adamw_scratch": "AdamW", "dualopt_scratch": "DualOpt scratch"}


def scratch_table(runs: list[dict]) -> str:
    table, adam = _scratch_groups(runs)
    kinds = sorted({k for k, _ in table}, key=lambda k: 0 if k.startswith("adamw") else 1)
    lams = sorted({v for _, v in table})
    lines = ["| weight decay λ | " + " | ".join(f"{NAMES[k]} test acc % | {NAMES[k]} test loss | {NAMES[k]} train loss"
                                               for k in kinds) + " |",
             "|---:|" + "---:|---:|---:|" * len(kinds)]

    def cells(rs: list[dict]) -> str:
        return (f"{_ms(_final(rs, 'down_test_acc'), 1, 100)} | {_ms(_final(rs, 'down_test'))} "
                f"| {_ms(_final(rs, 'down_train'))}")

    if adam:
        lines.append("| 0 (plain Adam: both rules coincide) | " + " | ".join(cells(adam) for _ in kinds) + " |")
    for lam in lams:
        lines.append(f"| {lam:g} | " + " | ".join(cells(table[(k, lam)]) for k in kinds) + " |")
    lines.append("")
    summary, chosen = [], {}
    for k in kinds:
        val = {lam: mean_std(_final(table[(k, lam)], "down_val"))[0] for lam in lams}
        acc = {lam: 100 * mean_std(_final(table[(k, lam)], "down_test_acc"))[0] for lam in lams}
        lam_v = min(val, key=val.get)
        chosen[k] = lam_v
        rs = table[(k, lam_v)]
        best_acc = max(acc.values())
        near = [lam for lam in lams if acc[lam] >= best_acc - 0.5]
        summary.append(
            f"- **{NAMES[k]}**: λ selected on validation = {lam_v:g}, test accuracy "
            f"{_ms(_final(rs, 'down_test_acc'), 1, 100)} %, test loss {_ms(_final(rs, 'down_test'))}; "
            f"test accuracy over the sweep ranges {min(acc.values()):.1f}-{best_acc:.1f} % "
            f"(spread {best_acc - min(acc.values()):.1f} points); λ within 0.5 points of its best: "
            f"{', '.join(f'{x:g}' for x in near)}.")
    if len(kinds) == 2:
        a, d = (table[(k, chosen[k])] for k in kinds)
        summary.append(f"- DualOpt scratch minus AdamW, each at its selected λ (paired by seed): test accuracy "
                       f"{_ms(_paired(d, a, lambda r: 100 * r['curve'][-1]['down_test_acc']), 2, sign=True)} "
                       f"points, test loss {_ms(_paired(d, a, lambda r: r['curve'][-1]['down_test']), sign=True)}.")
    if adam:
        summary.append(f"- No decay (λ = 0): test accuracy {_ms(_final(adam, 'down_test_acc'), 1, 100)} %, "
                       f"test loss {_ms(_final(adam, 'down_test'))}.")
    lines.append("Downstream test scores at the final step (nats/char; mean ± sample std over seeds); λ is "
                 "selected on downstream validation loss.\n")
    lines += summary
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_finetune(runs: list[dict], pretrained: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    groups = group_runs(runs)
    chosen = set(finetune_selection(runs).values())
    colors = {"adamw": "C0", "l2sp": "C1", "probe": "C2", "dualopt": "C3"}
    for label, rs in groups.items():
        fam, m = rs[0].get("family"), rs[0]["method"]
        if "up_val" not in rs[0]["curve"][-1]:
            continue
        color = colors.get(fam, "C7")
        marker = "s" if m["kind"] == "dualopt" else ("^" if m["kind"] == "probe" else "o")
        if m.get("anchor", "float32") != "float32":
            marker = "x"
        dx = mean_std(_final(rs, "down_test"))
        uy = mean_std(_final(rs, "up_val"))
        ax1.errorbar(dx[0], uy[0], xerr=dx[1], yerr=uy[1], fmt=marker, color=color, capsize=3,
                     ms=9 if label in chosen else 5, mfc=color if label in chosen else "none",
                     label=label + (" (selected)" if label in chosen else ""))
    up0 = mean_std(p["up_val"] for p in pretrained)[0]
    ax1.axhline(up0, color="gray", ls="--", lw=1, label="upstream loss before fine-tuning")
    ax1.set_xlabel("downstream test loss after fine-tuning (nats/char, lower is better)")
    ax1.set_ylabel("upstream held-out loss, kept head (lower = less forgetting)")
    ax1.set_title("Fine-tuning trade-off, every configuration (mean ± std over seeds)")
    ax1.legend(fontsize=6, loc="best")
    for label in groups:
        rs = groups[label]
        if label not in chosen and rs[0]["method"]["kind"] != "adamw_random":
            continue
        steps = [c["step"] for c in rs[0]["curve"]]
        mean_curve = [mean_std(r["curve"][j]["down_val"] for r in rs)[0] for j in range(len(steps))]
        ax2.plot(steps, mean_curve, marker="o", color=colors.get(rs[0].get("family"), "C7"), label=label)
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("downstream validation loss (mean over seeds)")
    ax2.set_title("Selected configurations during fine-tuning")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scratch(runs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    table, adam = _scratch_groups(runs)
    names = {"adamw_scratch": "AdamW (decoupled decay)", "dualopt_scratch": "DualOpt scratch (real-time layer-wise decay)"}
    kinds = sorted({k for k, _ in table})
    for i, kind in enumerate(kinds):
        lams = sorted(v for k, v in table if k == kind)
        for ax, key, scale in ((ax1, "down_test_acc", 100.0), (ax2, "down_test", 1.0)):
            ys = [mean_std(x * scale for x in _final(table[(kind, lam)], key)) for lam in lams]
            ax.errorbar(lams, [m for m, _ in ys], yerr=[s for _, s in ys], marker="o", color=f"C{i}", capsize=3,
                        label=names[kind])
    if adam:
        for ax, key, scale in ((ax1, "down_test_acc", 100.0), (ax2, "down_test", 1.0)):
            m, s = mean_std(x * scale for x in _final(adam, key))
            ax.axhline(m, color="gray", ls="--", lw=1, label=f"λ = 0 (plain Adam): {m:.3g} ± {s:.2g}")
    for ax, ylabel in ((ax1, "downstream test accuracy % (final step)"), (ax2, "downstream test loss, nats/char")):
        ax.set_xscale("log")
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel(ylabel + ", mean ± std")
        ax.legend(fontsize=8)
    ax1.set_title("From scratch: final accuracy against weight decay")
    ax2.set_title("From scratch: final loss against weight decay")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
