"""How far a trajectory is from its reference: absolute, relative, ulp and scaled errors per step.

The *scaled error* of a step is the verdict's measure: for each tensor,
``max|got - ref| / scale`` where ``scale`` is the largest magnitude the
reference tensor has held so far (initial value included), maximised over the
tensors. It is invariant under rescaling a case (the tiny and huge magnitude
vectors) and does not blow up on elements that happen to be near zero, which
element-wise relative and ulp errors do; those two are reported as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .ulp import ulp_distance

__all__ = ["Deviation", "compare"]


@dataclass
class Deviation:
    """Errors of one trajectory against its reference.

    ``scaled[t]`` is the scaled error after step (or epoch) ``t + 1``;
    ``problems`` lists structural mismatches (missing steps or tensors, wrong
    dtype or shape) and non-finite values where the reference is finite. Any
    problem makes the comparison fail whatever the tolerance.
    """

    steps: int
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    scaled: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Bitwise identical to the reference (every element 0 ulp away, no problems)."""
        return not self.problems and self.max_ulp == 0.0

    @property
    def max_scaled(self) -> float:
        return max(self.scaled, default=0.0)


def _rel(diff: np.ndarray, ref: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    return float(np.nanmax(rel)) if rel.size else 0.0


def compare(got: Sequence[Mapping[str, np.ndarray]], ref: Sequence[Mapping[str, np.ndarray]],
            initial: Mapping[str, np.ndarray]) -> Deviation:
    """Compare ``got`` with ``ref`` step by step; both are lists of ``{tensor name: array}``.

    Examples
    --------
    >>> import numpy as np
    >>> ref = [{"w": np.array([1.0, -2.0])}]
    >>> got = [{"w": np.array([1.0, np.nextafter(-2.0, 0.0)])}]
    >>> d = compare(got, ref, {"w": np.array([1.0, -4.0])})
    >>> d.max_ulp, d.exact, d.scaled == [2.0**-52 / 4]
    (1.0, False, True)
    """
    dev = Deviation(steps=len(ref))
    if len(got) != len(ref):
        dev.problems.append(f"{len(got)} steps returned, expected {len(ref)}")
    scale = {n: (float(np.max(np.abs(a))) if np.size(a) else 0.0) for n, a in initial.items()}
    for t, (g_step, r_step) in enumerate(zip(got, ref)):
        worst = 0.0
        for name, r in r_step.items():
            r = np.asarray(r)
            scale[name] = max(scale.get(name, 0.0), float(np.max(np.abs(r))) if r.size else 0.0)
            if name not in g_step:
                dev.problems.append(f"step {t + 1}: tensor {name!r} missing")
                worst = np.inf
                continue
            g = np.asarray(g_step[name])
            if g.dtype != r.dtype or g.shape != r.shape:
                dev.problems.append(f"step {t + 1}: {name!r} is {g.dtype}{list(g.shape)}, expected {r.dtype}{list(r.shape)}")
                worst = np.inf
                continue
            if not r.size:
                continue
            bad = ~np.isfinite(g) & np.isfinite(r)
            if bad.any():
                dev.problems.append(f"step {t + 1}: {name!r} has {int(bad.sum())} non-finite values where the reference is finite")
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
            # Equal infinities and NaN against NaN agree; g - r would say NaN.
            diff = np.where((g == r) | (np.isnan(g) & np.isnan(r)), 0.0, diff)
            diff = np.where(bad, np.inf, diff)
            dev.max_abs = max(dev.max_abs, float(diff.max()))
            dev.max_rel = max(dev.max_rel, _rel(diff, r))
            dev.max_ulp = max(dev.max_ulp, float(ulp_distance(g, r).max()))
            d = float(diff.max())
            worst = max(worst, d / scale[name] if scale[name] > 0 else (0.0 if d == 0 else np.inf))
        dev.scaled.append(worst)
    # Keep one line per kind of problem readable: the first few only.
    if len(dev.problems) > 5:
        dev.problems = dev.problems[:5] + [f"... and {len(dev.problems) - 5} more"]
    return dev
