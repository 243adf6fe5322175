"""Smoke run of ``benchmarks/step_cost_optax.py --tiny``: it runs, prints one row per variant and set, and
its static traffic column says what the compiled steps move. Speed is never asserted (the script prints it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "step_cost_optax.py"


def test_tiny_run_prints_every_row():
    assert '"--tiny"' in SCRIPT.read_text()  # benchmarks/run_all.py passes --tiny only to scripts that have it
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+)\s+(optax\.adamw(?: \(control\))?|apply_if_finite\(adamw\)|dualopt \w+ \w+)"
                     r"\s+(.*)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3).split()
    variants = ["optax.adamw", "optax.adamw (control)", "apply_if_finite(adamw)"]
    variants += [f"dualopt {mode} {policy}" for policy in ("skip", "propagate") for mode in ("scratch", "finetune")]
    assert set(rows) == {(s, v) for s in ("4x64^2", "20x8^2") for v in variants}
    assert "2 build order(s)" in proc.stdout  # --tiny runs two child processes per set
    for (set_name, variant), cols in rows.items():
        median, _, _, ratio = (float(c) for c in cols[:4])
        low, high = (float(c) for c in cols[4].split("-"))
        cpu, compile_s = float(cols[5]), float(cols[9])
        assert median > 0 and ratio > 0 and cpu >= 0 and compile_s > 0
        assert low <= round(ratio, 2) <= high  # the median of the orders' ratios lies within their range
        if variant == "optax.adamw":
            assert ratio == 1.0 and low == high == 1.0
        if set_name == "4x64^2":  # large enough leaves that every loop's traffic is its arrays'
            want = {"optax.adamw": 40.0, "optax.adamw (control)": 40.0, "dualopt scratch skip": 48.0,
                    "dualopt scratch propagate": 40.0}.get(variant)
            if want is not None:
                assert float(cols[7]) == want, (variant, cols[7])
        if variant.startswith("dualopt"):
            assert cols[10].startswith("<=")
            # issue 21's contract: skip priced against the guarded route, propagate against optax.adamw
            ref = "apply_if_finite(adamw))" if variant.endswith("skip") else "optax.adamw)"
            assert cols[-1] == ref and cols[-4] == "cpu", cols
