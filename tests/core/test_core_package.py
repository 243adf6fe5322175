"""Package-level guarantees of decoupled_core: framework-free imports and runnable docstring examples."""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys

import pytest

CORE_MODULES = [
    "decoupled_core",
    "decoupled_core._xp",
    "decoupled_core.hyperparams",
    "decoupled_core.layers",
    "decoupled_core.coefficients",
    "decoupled_core.rule",
    "decoupled_core.reference",
]
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "optax", "flax")


def test_core_imports_no_framework():
    """Importing the core, and running it on numpy arrays, loads no ML framework."""
    code = (
        "import sys, json, numpy as np\n"
        "import decoupled_core as dc\n"
        "opt = dc.ReferenceOptimizer([np.ones(3)], [dc.HyperParams(paradigm='finetune')], base_lr=1e-3)\n"
        "opt.step([np.ones(3)], 1e-3)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_core_modules_are_all_listed():
    """CORE_MODULES (the doctest list below) covers every module of the package."""
    import pkgutil

    import decoupled_core

    found = {f"decoupled_core.{m.name}" for m in pkgutil.iter_modules(decoupled_core.__path__)}
    assert found | {"decoupled_core"} == set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES + ["dualopt.spec.vectors"])
def test_doctests(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {module}"


def test_public_functions_have_runnable_examples():
    """Most public core functions carry a doctest; a module without any examples is a documentation bug."""
    attempted = {}
    for module in CORE_MODULES[1:] + ["dualopt.spec.vectors"]:
        mod = importlib.import_module(module)
        attempted[module] = sum(len(t.examples) for t in doctest.DocTestFinder().find(mod))
    # _xp is plumbing; every other module documents itself with examples.
    assert all(n > 0 for m, n in attempted.items() if m != "decoupled_core._xp"), attempted
