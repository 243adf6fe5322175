"""CI smoke run of the benchmarks at tiny sizes (issue 7): they run, print their tables, and their
figures are consistent. Speed is never asserted here; the benchmarks print it.

One ``run_all.py --tiny`` run (floor/memory, fine-tuning, from-scratch) is shared by every test
in this module; the per-adapter ``step_cost_*.py`` scripts have their own smoke tests.
"""

from __future__ import annotations

import json
import math
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
                           "finetune", "scratch", "--out", str(out)], capture_output=True, text=True, timeout=300,
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
    for header in ("Streaming add bandwidth", "| optimizer | ms/step (median) |", "% of floor",
                   "speed-up vs naive", "### Optimizer state", "### Peak resident memory", "Same rule check"):
        assert header in text
    res = json.loads((out / "floor_memory.json").read_text())
    assert res["unavailable"] is None, res["unavailable"]
    # DualOpt and the hand-written OLOR/LPWD are the same rule: float64 trajectories agree to rounding.
    for paradigm in ("finetune", "scratch"):
        assert res["check"][paradigm]["max_relative_gap"] < 1e-12
        assert res["check"][paradigm]["max_abs_change"] > 1e-4  # the weights did move
    for s in res["results"]:
        n, rows = s["elements"], s["rows"]
        assert s["bandwidth_GBps"] > 0
        # Adam moments: 2 float32 words per element; finetune adds the anchor (a third word).
        assert rows["DualOpt scratch"]["state_bytes"] == 8 * n
        assert rows["DualOpt finetune"]["state_bytes"] == 12 * n
        assert rows["naive OLOR (finetune)"]["state_bytes"] == 12 * n
        assert rows["AdamW fused"]["state_bytes"] == 8 * n + 4 * s["tensors"]  # + one float32 step per tensor
        for name, r in rows.items():
            assert r["median"] > 0 and 0 < r["pct_of_floor"], name
            assert r["bytes_per_step"] == (8 if "finetune" in name else 7) * 4 * n
    assert set(res["peaks"]) == {"AdamW fused", "DualOpt finetune"}


def test_finetune_table_and_retention(run):
    out, _ = run
    text = (out / "finetune.txt").read_text()
    assert "## Fine-tuning: downstream quality and upstream retention" in text
    assert "| method | downstream val loss (final) |" in text
    res = json.loads((out / "quality" / "tiny" / "finetune.json").read_text())
    labels = {r["label"] for r in res["runs"]}
    assert {"AdamW (full fine-tuning)", "Linear probe (frozen backbone)", "AdamW + L2-SP a=0.1",
            "DualOpt finetune lr*k_max=0.01", "DualOpt finetune lr*k_max=0.1",
            "DualOpt finetune lr*k_max=0.1, per-module layers"} == labels
    assert len(res["runs"]) == len(labels) * len(res["config"]["seeds"])
    up0 = {p["seed"]: p["up_val"] for p in res["pretrained"]}
    for r in res["runs"]:
        final = r["curve"][-1]
        assert all(math.isfinite(final[k]) for k in ("down_val", "down_train", "up_val"))
        if r["method"]["kind"] == "probe":  # frozen backbone + the kept upstream head: nothing forgotten
            assert final["up_val"] == pytest.approx(up0[r["seed"]], abs=1e-6)
    assert (out / "quality" / "tiny" / "finetune.png").stat().st_size > 10_000


def test_scratch_sweep_table(run):
    out, _ = run
    text = (out / "scratch.txt").read_text()
    assert "| weight decay λ | AdamW final | AdamW best | DualOpt scratch final | DualOpt scratch best |" in text
    res = json.loads((out / "quality" / "tiny" / "scratch.json").read_text())
    cfg = res["config"]
    assert len(res["runs"]) == 2 * len(cfg["weight_decays"]) * len(cfg["seeds"])
    for lam in cfg["weight_decays"]:
        assert f"| {lam:g} |" in text
    assert (out / "quality" / "tiny" / "scratch.png").stat().st_size > 10_000
