"""The DualOpt conformance suite: ``python -m dualopt.conformance`` (see ``conformance/README.md``).

For implementations outside this repository::

    from dualopt.conformance import pytest_suite
    test_dualopt = pytest_suite(my_replay, "my port")

Nothing here imports a framework; the names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pytest_suite", "check_case", "ReplayImplementation", "SubprocessReplay", "run_suite"]

_LAZY = {"pytest_suite": "external", "check_case": "external", "ReplayImplementation": "external",
         "SubprocessReplay": "external", "run_suite": "runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
