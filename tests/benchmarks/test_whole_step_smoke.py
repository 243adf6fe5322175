"""Smoke run of ``benchmarks/whole_step.py --tiny`` (issue 21): every framework's whole training step runs
with AdamW and both DualOpt modes, and the table reports finite ratios to AdamW. Speed is never asserted."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "whole_step.py"
pytestmark = pytest.mark.xdist_group("benchmarks_smoke")


def _rows(stdout: str, framework: str) -> dict[str, tuple[float, float, float, float]]:
    section = stdout.split(f"\n{framework}: ")[1].split("worker wall time")[0]
    assert "0.0 M parameters (width 32, depth 2, 8 tokens, batch 2), 2 interleaved repeats" in section
    rows = re.findall(r"^  (AdamW|DualOpt scratch|DualOpt finetune)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                      section, re.M)
    return {name: tuple(map(float, nums)) for name, *nums in rows}


def _run(frameworks: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--frameworks", frameworks], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _check(stdout: str, framework: str) -> None:
    got = _rows(stdout, framework)
    assert set(got) == {"AdamW", "DualOpt scratch", "DualOpt finetune"}, framework
    for name, (wall, wall_ratio, cpu, cpu_ratio) in got.items():
        assert wall > 0 and cpu >= 0 and math.isfinite(wall_ratio) and wall_ratio > 0, (framework, name)
        if name == "AdamW":
            assert wall_ratio == cpu_ratio == 1.0
    assert re.search(r"^  DualOpt scratch .*<= 1\.02 (ok|OVER)$", stdout.split(f"\n{framework}: ")[1], re.M)


def test_whole_step_tiny_torch_and_flax():
    pytest.importorskip("torch")
    pytest.importorskip("flax")
    stdout = _run("torch,flax")
    for fw in ("torch", "flax"):
        _check(stdout, fw)


@pytest.mark.slow
def test_whole_step_tiny_keras_jax():
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    _check(_run("keras-jax"), "keras-jax")


def test_unknown_framework_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--frameworks", "mxnet"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "'mxnet' is not one of" in proc.stderr
