"""Lazy imports of the suite, and the full run over every installed framework (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "optax")


def test_discovery_imports_no_framework():
    """Finding and classifying every implementation must not import torch, jax, tensorflow or keras."""
    code = (
        "import sys\n"
        "from dualopt.conformance.discovery import discover\n"
        "from dualopt.conformance.tolerances import numerics_class\n"
        "entries = discover()\n"
        "[numerics_class(e.impl) for e in entries if e.impl is not None]\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print(len(entries))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 5  # at least the five core variants


@pytest.mark.slow
def test_full_suite_every_installed_framework(tmp_path):
    """``make conformance``: every implementation, both loops, both dtypes; nothing may fail.

    Frameworks that are installed must actually run (not be skipped), so a
    broken import cannot turn the whole suite green.
    """
    proc = subprocess.run([sys.executable, "-m", "dualopt.conformance", "--report", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    report = json.loads((tmp_path / "conformance.json").read_text())
    failing = [f"{r['implementation']} {r['case']}: {r['note']}" for r in report["rows"] if r["status"] == "FAIL"]
    assert not failing and proc.returncode == 0, "\n".join(failing[:20]) + proc.stdout[-3000:]
    ran = {a["framework"].split("[")[0] for a in report["aggregate"] if a["verdict"] in ("exact", "pass")}
    for module, framework in (("torch", "torch"), ("optax", "optax"), ("keras", "keras")):
        if importlib.util.find_spec(module) is not None:
            assert framework in ran, f"{framework} is installed but none of its implementations ran"
    # The degenerate comparison has the frameworks' own Adam in it.
    natives = {r["implementation"] for r in report["rows"] if r["case"] == "closed:none" and r["numerics"].startswith("native")}
    assert len(natives) >= 1
    assert (tmp_path / "conformance.png").stat().st_size > 10_000
