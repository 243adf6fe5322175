"""Fixtures for the torch adapter tests.

Every test runs with one intra-op thread (restored afterwards, so other suites
in the same xdist worker keep their setting). The tensors here are tiny: a
thread pool only adds synchronisation, and on a shared 2-core CI machine that
has measured 15-30x slower (a 300-step MLP run: 10 s with 2 threads under load,
0.6 s with one). Results do not depend on it: every comparison in a test is
between runs made with the same setting.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

import tests.common.offline_hub  # noqa: F401  (before any test module imports transformers or peft)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: Any) -> Iterator[None]:
    yield
