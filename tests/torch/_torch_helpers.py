"""Shared helpers of the torch adapter tests (``from tests.torch._torch_helpers import ...``).

- bit-level comparison of tensors (``-0.0`` and NaN payloads count, bfloat16 included);
- the fast path's documented tolerance (``conformance.tolerances.FAST_PATH_TOLERANCE``) as an assertion;
- the core's :class:`decoupled_core.ReferenceOptimizer` on torch tensors, for replaying gradients.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

import decoupled_core as dc
from dualopt.conformance.tolerances import FAST_PATH_TOLERANCE


def xp() -> Any:
    """The core's namespace for torch tensors (array-api-compat)."""
    import array_api_compat.torch as xp_torch

    return xp_torch


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of ``t`` as unsigned integers (a copy on the CPU)."""
    t = t.detach().cpu().contiguous()
    itype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.view(itype).numpy().copy()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and np.array_equal(bits(a), bits(b))


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (what, a.shape, b.shape)
    if not same_bits(a, b):
        diff = (a.detach().double() - b.detach().double()).abs()
        raise AssertionError(f"{what}: not bitwise equal, max |diff| = {float(diff.max()):.3g} "
                             f"on {int((bits(a) != bits(b)).sum())} of {a.numel()} elements")


def fast_bound(dtype: torch.dtype, step: int, scale: float) -> float:
    """The fast Adam path's allowed distance from the reference after ``step`` updates.

    ``FAST_PATH_TOLERANCE * sqrt(t) * eps(dtype) * scale``, with ``scale`` the largest
    magnitude the reference tensor has held so far (the conformance suite's
    "scaled error", so the bound means the same for tiny and huge tensors).
    """
    return FAST_PATH_TOLERANCE * math.sqrt(max(step, 1)) * torch.finfo(dtype).eps * scale


class ScaledTracker:
    """Keeps each tensor's largest reference magnitude so far, for :func:`fast_bound`."""

    def __init__(self, initial: Sequence[torch.Tensor]) -> None:
        self.scale = [float(t.detach().double().abs().max()) if t.numel() else 0.0 for t in initial]

    def check(self, got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], step: int, what: str = "") -> float:
        """Assert ``got`` is within the fast-path bound of ``ref``; return the worst ratio to the bound."""
        worst = 0.0
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.dtype == r.dtype and tuple(g.shape) == tuple(r.shape), (what, i, g.dtype, r.dtype)
            if r.numel() == 0:
                continue
            self.scale[i] = max(self.scale[i], float(r.detach().double().abs().max()))
            err = float((g.detach().double() - r.detach().double()).abs().max())
            bound = fast_bound(r.dtype, step, self.scale[i])
            assert err <= bound, f"{what} tensor {i} step {step}: |fast - reference| = {err:.3g} > {bound:.3g}"
            if bound > 0:
                worst = max(worst, err / bound)
        return worst


def reference_optimizer(params: Sequence[torch.Tensor], hps: Sequence[dc.HyperParams], *, base_lr: float,
                        layer_index: Sequence[int] | None = None, anchors: Sequence[Any] | None = None,
                        nonfinite: str = "skip") -> dc.ReferenceOptimizer:
    """The core's optimizer over detached copies of ``params`` (torch tensors, same dtypes)."""
    return dc.ReferenceOptimizer([p.detach().clone() for p in params], list(hps), base_lr=base_lr,
                                 layer_index=layer_index, anchors=anchors, nonfinite=nonfinite, xp=xp())


def core_step(params: list[torch.Tensor], grads: Sequence[torch.Tensor | None], states: list[Any],
              anchors: Sequence[torch.Tensor | None], steps: list[int], *, hps: Sequence[dc.HyperParams],
              rates: Sequence[float], lr: float) -> None:
    """One update through :func:`decoupled_core.step_tensor` with per-call hyperparameters (schedulers
    that cycle beta1 or momentum): the core fed exactly what the adapter was fed. Updates the lists in place."""
    for i, g in enumerate(grads):
        if g is None:
            continue
        steps[i] += 1
        params[i], states[i] = dc.step_tensor(params[i], g, states[i], anchors[i], hp=hps[i], lr=lr,
                                              step=steps[i], rate=rates[i], xp=xp())


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, sizes: Sequence[int] = (6, 16, 16, 3)) -> torch.nn.Sequential:
    """A small tanh MLP with a deterministic initialisation."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def fixed_data(n: int = 64, d_in: int = 6, classes: int = 3, seed: int = 1, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)
