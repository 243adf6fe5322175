"""Settings shared by every suite.

Hypothesis runs derandomized by default: CI starts from a clean checkout with no
example database, and a property test must not pass or fail by the luck of the
draw. Set ``HYPOTHESIS_PROFILE=explore`` to search new random examples locally;
a failure found that way is printed with the example to pin down with
``@example``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_torch_thread() -> Iterator[Any]:
    """torch with one intra-op thread for the test, restored afterwards (other suites in the same xdist worker
    keep their setting). The tensors in the tests are tiny: on a shared 2-core machine torch's thread pool
    only adds synchronisation, measured 15-30x slower under load. Yields the torch module."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)
