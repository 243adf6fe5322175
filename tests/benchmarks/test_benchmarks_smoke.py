"""CI smoke run of the benchmarks at tiny sizes (issue 7): they run, print their tables, and their
figures are consistent. Speed is never asserted here; the benchmarks print it.

One ``run_all.py --tiny`` run (floor/memory, fine-tuning, from-scratch) is shared by every test
in this module; the per-adapter ``step_cost_*.py`` scripts have their own smoke tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("benchmarks_smoke")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--tiny", "--only", "floor",
                           "finetune", "scratch", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_summary_lists_every_part_with_status(run):
    out, stdout = run
    summary = (out / "summary.md").read_text()
    for part in ("floor", "finetune", "scratch"):
        assert f"| {part} | ok |" in summary
    assert "Total wall time" in stdout


def test_floor_memory_tables_and_exact_state_bytes(run):
    out, _ = run
    text = (out / "floor.txt").read_text()
    for header in ("Streaming bandwidth", "| optimizer | ms/step (median) |", "% of floor", "speed-up vs naive",
                   "### Optimizer state", "### What the anchor costs", "### Peak resident memory",
                   "Same rule check"):
        assert header in text
    res = json.loads((out / "floor_memory.json").read_text())
    assert res["unavailable"] is None, res["unavailable"]
    # DualOpt and the hand-written OLOR/LPWD are the same rule: float64 trajectories agree to rounding
    # (also with the anchor rounded to bfloat16, which the bfloat16-anchor row stores).
    assert set(res["check"]) == {"finetune", "scratch", "finetune, bfloat16 anchor"}
    for case in res["check"].values():
        assert case["max_relative_gap"] < 1e-12
        assert case["max_abs_change"] > 1e-4  # the weights did move
    for s in res["results"]:
        n, rows = s["elements"], s["rows"]
        assert set(s["stream"]) == {"stream a.add_(b)", "stream add(a, b, out=c)"}
        # the floor uses the faster streaming kernel (the strictest floor)
        assert s["bandwidth_GBps"] == pytest.approx(max(k["GBps"] for k in s["stream"].values()))
        # Adam moments: 2 float32 words per element; finetune adds the anchor (a third word, or 2 bytes).
        # DualOpt, like fused AdamW, keeps each tensor's step count as a float32 tensor (4 bytes per tensor).
        assert rows["DualOpt scratch"]["state_bytes"] == 8 * n + 4 * s["tensors"]
        assert rows["DualOpt finetune"]["state_bytes"] == 12 * n + 4 * s["tensors"]
        assert rows["naive OLOR (finetune)"]["state_bytes"] == 12 * n
        assert rows["naive OLOR, bfloat16 anchor"]["state_bytes"] == 10 * n
        assert rows["AdamW fused"]["state_bytes"] == 8 * n + 4 * s["tensors"]  # + one float32 step per tensor
        for name, r in rows.items():
            assert r["median"] > 0 and 0 < r["pct_of_floor"], name
            per_element = 30 if "bfloat16" in name else 32 if "finetune" in name else 28
            assert r["bytes_per_step"] == per_element * n, name
            assert r["floor_s"] == pytest.approx(r["bytes_per_step"] / (s["bandwidth_GBps"] * 1e9))
    assert set(res["peaks"]) == {"AdamW fused", "DualOpt finetune"}


def _quality(out, name):
    return json.loads((out / "quality" / "tiny" / f"{name}.json").read_text())


def test_finetune_table_selection_and_retention(run):
    out, _ = run
    text = (out / "finetune.txt").read_text()
    assert "## Fine-tuning: downstream quality and upstream retention" in text
    for header in ("**Selected configurations**", "| method | selected setting | downstream test loss |",
                   "**Every configuration**", "**Lower-precision anchor, emulated**"):
        assert header in text
    res = _quality(out, "finetune")
    labels = {r["label"] for r in res["runs"]}
    assert {"AdamW (full fine-tuning)", "Linear probe (frozen backbone) lr=0.001", "AdamW + L2-SP alpha=0.1",
            "DualOpt finetune lr*k_max=0.01", "DualOpt finetune lr*k_max=0.1",
            "DualOpt finetune lr*k_max=0.1, per-module layers", "DualOpt finetune lr*k_max=0.1, bfloat16 anchor",
            "AdamW from random init (no pretraining)"} == labels
    assert len(res["runs"]) == len(labels) * len(res["config"]["seeds"])
    pre = {p["seed"]: p for p in res["pretrained"]}
    for r in res["runs"]:
        final = r["curve"][-1]
        keys = ["down_val", "down_val_acc", "down_test", "down_test_acc", "down_train"]
        if r["method"]["kind"] != "adamw_random":
            keys += ["up_val", "up_val_acc", "up_val_refit"]
        assert all(math.isfinite(final[k]) for k in keys), r["label"]
        assert final["down_val"] != final["down_test"]  # different files
        if r["method"]["kind"] == "probe":  # frozen backbone + the kept upstream head: nothing forgotten
            assert final["up_val"] == pytest.approx(pre[r["seed"]]["up_val"], abs=1e-6)
            # the refitted head sees the same (frozen) features and batches as before fine-tuning
            assert final["up_val_refit"] == pytest.approx(pre[r["seed"]]["up_val_refit"], abs=1e-6)
    # selection is on validation: each family's chosen label has the lowest mean final validation loss
    import statistics
    by_label: dict = {}
    for r in res["runs"]:
        by_label.setdefault(r["label"], []).append(r)
    from benchmarks.quality.report import finetune_selection
    chosen = finetune_selection(res["runs"])
    assert set(chosen) == {"adamw", "l2sp", "probe", "dualopt"}
    for fam, label in chosen.items():
        mean_val = {lab: statistics.fmean(r["curve"][-1]["down_val"] for r in rs) for lab, rs in by_label.items()
                    if rs[0]["family"] == fam}
        assert label == min(mean_val, key=mean_val.get)
    # reference and emulation rows never compete
    assert all(rs[0]["family"] is None for lab, rs in by_label.items()
               if "random init" in lab or "bfloat16" in lab or "per-module" in lab)
    assert (out / "quality" / "tiny" / "finetune.png").stat().st_size > 10_000


def test_scratch_sweep_table(run):
    out, _ = run
    text = (out / "scratch.txt").read_text()
    assert "| weight decay λ | AdamW test acc % | AdamW test loss | AdamW train loss | DualOpt scratch test acc % |" in text
    assert "| 0 (plain Adam: both rules coincide) |" in text
    res = _quality(out, "scratch")
    cfg = res["config"]
    assert len(res["runs"]) == (2 * len(cfg["weight_decays"]) + 1) * len(cfg["seeds"])
    for lam in cfg["weight_decays"]:
        assert f"| {lam:g} |" in text
    for r in res["runs"]:
        assert 0 <= r["curve"][-1]["down_test_acc"] <= 1
    assert (out / "quality" / "tiny" / "scratch.png").stat().st_size > 10_000


def test_publish_refuses_tiny():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--tiny", "--publish"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "not with --tiny" in proc.stderr


@pytest.mark.slow
def test_keras_step_cost_tiny_reports_every_backend():
    """``step_cost_keras.py --tiny``: one worker per Keras backend, ratios to keras AdamW printed (never asserted)."""
    import re

    pytest.importorskip("keras")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost_keras.py"), "--tiny"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for backend in ("jax", "torch", "tensorflow"):
        if f"keras [{backend}]: skipped" in proc.stdout:
            continue
        section = proc.stdout.split(f"[{backend}], float32")[1].split("worker wall time")[0]
        rows = re.findall(r"^\s+4x64\^2\s+(apply|fit)\s+(.+?)\s+([\d.]+)\s+([\d.]+)x", section, re.M)
        got = {(mode, name): (float(ms), float(ratio)) for mode, name, ms, ratio in rows}
        assert set(got) == {(m, n) for m in ("apply", "fit") for n in ("AdamW", "DualOpt scratch", "DualOpt finetune")
                            } | {("apply", "AdamW, same check")}  # the guarded reference of the skip rows
        for (mode, name), (ms, ratio) in got.items():
            assert ms > 0 and math.isfinite(ratio) and ratio > 0, (backend, mode, name)
            if name == "AdamW":
                assert ratio == 1.0


def test_keras_jax_fit_skip_tiny_prints_every_variant():
    """``keras_jax_fit_skip.py --tiny``: every variant trains under ``fit`` and gets a ratio (never asserted)."""
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "keras_jax_fit_skip.py"), "--tiny"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, KERAS_BACKEND="jax"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^  (.+?)\s+([\d.]+) ms/step\s+([\d.]+)x AdamW$", proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["AdamW", "AdamW, same check and cond", "DualOpt propagate", "DualOpt skip",
                                    "skip, check without cond", "skip, cond on one element", "propagate, barrier"]
    assert rows[0][2] == "1.00" and all(float(r[1]) > 0 for r in rows)
