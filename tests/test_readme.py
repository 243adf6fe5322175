"""README.md's examples run as written.

Every fenced ``python`` block of README.md is a complete script; each runs in a
fresh interpreter (a Keras block picks its backend through ``KERAS_BACKEND``
before importing Keras, which a shared process could not do twice) from an
empty working directory. The blocks assert the values they show, so a block
that runs but computes something else fails here too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def _needs(source: str) -> list[str]:
    found = set(re.findall(r"^\s*(?:import|from)\s+(torch|jax|optax|keras|tensorflow|transformers|peft|lightning|flax|"
                           r"orbax)\b", source, re.M))
    backend = re.search(r'KERAS_BACKEND"\]\s*=\s*"(\w+)"', source)
    if backend:
        found.add(backend.group(1))
    return sorted(found)


def test_readme_has_an_example_per_framework():
    needs = [set(_needs(b)) for b in blocks()]
    for framework in ("torch", "optax", "keras"):
        assert any(framework in n for n in needs), f"README.md has no {framework} example"


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs(index, tmp_path):
    source = blocks()[index]
    for module in _needs(source):
        pytest.importorskip(module)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README block {index} failed:\n{source}\n--- stderr ---\n{proc.stderr[-4000:]}"
