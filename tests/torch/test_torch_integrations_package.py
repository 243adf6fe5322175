"""The integration helpers as part of the package: docstring examples, lazy imports, ``py.typed`` shipped."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_docstring_examples():
    pytest.importorskip("torch")
    mod = importlib.import_module("dualopt.torch._integrations")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result


def test_helpers_import_no_integration_library():
    """Importing the torch adapter and its integration helpers loads neither transformers, peft nor lightning."""
    pytest.importorskip("torch")
    code = ("import sys, json; import dualopt.torch, dualopt.torch._integrations; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'transformers', 'peft', 'lightning', 'pytorch_lightning', 'accelerate', 'flax', 'orbax', 'jax'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_py_typed_is_shipped():
    assert (ROOT / "backends" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["dualopt"]
    extra = config["project"]["optional-dependencies"]["integrations"]
    pins = (ROOT / "requirements-lock.txt").read_text().split()
    lock = {line.split("==")[0].lower().replace("_", "-") for line in pins if "==" in line}
    for requirement in extra:  # every integration library the tests need is pinned, so `make setup` installs it
        name = requirement.split(">")[0].split("=")[0].lower()
        assert name in lock, name
