"""pytest plugin for ``benchmarks/gpu_check.sh``: torch's default device is cuda in every test.

Loaded with ``-p tests.torch._cuda_default`` (from the repository root). Tests written for CPU
tensors then create their models and data on the GPU; a failure that only says a CPU
generator or a CPU tensor met a cuda one is the test's, not the optimizer's.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _cuda_default_device() -> Iterator[None]:
    before = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(before)
