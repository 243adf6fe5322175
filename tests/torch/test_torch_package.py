"""``dualopt.torch`` as a package: docstring examples, lazy imports, the step-cost benchmark's smoke mode."""

from __future__ import annotations

import doctest
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["dualopt.torch", "dualopt.conformance.impl_torch"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result


def test_import_does_not_pull_other_frameworks():
    code = ("import sys, json; import dualopt.torch; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'optax', 'keras', 'tensorflow'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_step_cost_benchmark_tiny_mode():
    """``--tiny`` (used by benchmarks/run_all.py): every candidate gets a row with a ratio, and the bar line."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost_torch.py"), "--tiny"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {k: (a, b) for k, a, b in re.findall(
        r"^  (AdamW [\w-]+(?:, guarded \(GradScaler route\))?|DualOpt [\w ]+?)\s+[\d.]+\s+([\d.]+)x\s+([\d.]+)x$",
        out.stdout, re.M)}
    assert set(rows) == {"AdamW fused", "AdamW fused, guarded (GradScaler route)", "AdamW for-loop", "DualOpt scratch",
                         "DualOpt scratch propagate", "DualOpt finetune", "DualOpt finetune propagate",
                         "DualOpt finetune reference loop"}
    assert float(rows["AdamW fused"][0]) == 1.0 and float(rows["AdamW fused, guarded (GradScaler route)"][1]) == 1.0
    assert all(float(r) > 0 for pair in rows.values() for r in pair)
    assert re.search(r"^  skip vs guarded route: scratch [\d.]+x \(bar 1\.00x: (met|NOT met)\), finetune", out.stdout,
                     re.M)
    assert re.search(r"^  propagate vs AdamW fused: scratch [\d.]+x \(bar 1\.00x: (met|NOT met)\), finetune",
                     out.stdout, re.M)
