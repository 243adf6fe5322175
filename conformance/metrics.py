"""How far a trajectory is from its reference: absolute, relative, ulp and scaled errors per step.

The *scaled error* of a step is the verdict's measure: for each tensor,
``max|got - ref| / scale`` where ``scale`` is the largest magnitude the
reference tensor has held so far (initial value included), maximised over the
tensors. It is invariant under rescaling a case (the tiny and huge magnitude
vectors) and does not blow up on elements that happen to be near zero, which
element-wise relative and ulp errors do; those two are reported as well.

An ulp distance between values of opposite sign counts every float between
them (about 2**63 in float64 for a sign flip near zero) and says nothing about
the size of the error, so such elements are counted in ``sign_flips`` and left
out of ``max_ulp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .ulp import ulp_distance

__all__ = ["Deviation", "Where", "compare"]


@dataclass(frozen=True)
class Where:
    """The element with the largest scaled error of one step: which tensor, which element, both values.

    ``ulp`` is None when the two values have opposite signs (no meaningful ulp count).
    """

    step: int  # 1-based step (open loop) or epoch (closed loop)
    tensor: str  # the parameter's name (its path in the closed loop, e.g. "dense_0/kernel")
    index: tuple[int, ...]
    expected: float
    got: float
    abs_err: float
    ulp: float | None
    scaled: float
    dtype: str

    def values(self) -> str:
        """``parameter 'w0'[1, 2]: expected 0.75, got 0.7500001`` (values printed in the tensor's dtype)."""
        idx = "[" + ", ".join(str(i) for i in self.index) + "]" if self.index else ""
        show = lambda x: str(np.asarray(x, dtype=self.dtype)[()])  # noqa: E731 - shortest repr in that dtype
        return f"parameter {self.tensor!r}{idx}: expected {show(self.expected)}, got {show(self.got)}"

    def to_json(self) -> dict[str, Any]:
        return dict(step=self.step, tensor=self.tensor, kind="parameter", index=list(self.index),
                    expected=self.expected, got=self.got, abs_err=self.abs_err, ulp=self.ulp,
                    opposite_signs=self.ulp is None, scaled_error=self.scaled)


@dataclass
class Deviation:
    """Errors of one trajectory against its reference.

    ``scaled[t]`` is the scaled error after step (or epoch) ``t + 1`` and
    ``worst[t]`` the element that gave it (None where the step agrees
    exactly); ``problems`` lists structural mismatches (missing steps or
    tensors, wrong dtype or shape) and non-finite values where the reference
    is finite. Any problem makes the comparison fail whatever the tolerance.
    """

    steps: int
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    sign_flips: int = 0
    scaled: list[float] = field(default_factory=list)
    worst: list[Where | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Bitwise identical to the reference (every element 0 ulp away, no problems)."""
        return not self.problems and self.max_ulp == 0.0 and self.sign_flips == 0 and not any(self.scaled)

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
    >>> d.max_ulp, d.exact, d.scaled == [2.0**-52 / 4], d.worst[0].index
    (1.0, False, True, (1,))
    >>> compare([{"w": np.array([-1e-300])}], [{"w": np.array([1e-300])}], {"w": np.array([1.0])}).sign_flips
    1
    """
    dev = Deviation(steps=len(ref))
    if not isinstance(got, Sequence) or isinstance(got, (str, bytes)):
        dev.problems.append(f"returned a {type(got).__name__}, expected a list with one mapping per step")
        return dev
    if len(got) != len(ref):
        dev.problems.append(f"{len(got)} steps returned, expected {len(ref)}")
    scale = {n: (float(np.max(np.abs(a))) if np.size(a) else 0.0) for n, a in initial.items()}
    for t, (g_step, r_step) in enumerate(zip(got, ref)):
        worst = 0.0
        where: Where | None = None
        if not isinstance(g_step, Mapping):
            dev.problems.append(f"step {t + 1}: a {type(g_step).__name__}, expected a mapping tensor name -> array")
            dev.scaled.append(np.inf)
            dev.worst.append(None)
            continue
        for name, r in r_step.items():
            r = np.asarray(r)
            scale[name] = max(scale.get(name, 0.0), float(np.max(np.abs(r))) if r.size else 0.0)
            if name not in g_step:
                dev.problems.append(f"step {t + 1}: parameter {name!r} missing")
                worst = np.inf
                continue
            try:
                g = np.asarray(g_step[name])
            except Exception as exc:  # noqa: BLE001 - whatever a port returned, say what it was
                dev.problems.append(f"step {t + 1}: parameter {name!r} is not an array ({type(exc).__name__})")
                worst = np.inf
                continue
            if g.dtype != r.dtype or g.shape != r.shape:
                dev.problems.append(f"step {t + 1}: parameter {name!r} is {g.dtype}{list(g.shape)}, "
                                    f"expected {r.dtype}{list(r.shape)}")
                worst = np.inf
                continue
            if not r.size:
                continue
            bad = ~np.isfinite(g) & np.isfinite(r)
            if bad.any():
                dev.problems.append(f"step {t + 1}: parameter {name!r} has {int(bad.sum())} non-finite values "
                                    "where the reference is finite")
            with np.errstate(invalid="ignore", over="ignore"):
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
            # Equal infinities and NaN against NaN agree; g - r would say NaN.
            diff = np.where((g == r) | (np.isnan(g) & np.isnan(r)), 0.0, diff)
            diff = np.where(bad, np.inf, diff)
            flips = (np.signbit(g) != np.signbit(r)) & (g != 0) & (r != 0) & ~np.isnan(g) & ~np.isnan(r)
            ulp = ulp_distance(g, r)
            n_flips = int(flips.sum())
            dev.sign_flips += n_flips
            dev.max_abs = max(dev.max_abs, float(diff.max()))
            dev.max_rel = max(dev.max_rel, _rel(diff, r))
            dev.max_ulp = max(dev.max_ulp, float(np.where(flips, 0.0, ulp).max()))
            k = int(np.argmax(diff))
            d = float(diff.reshape(-1)[k])
            s = d / scale[name] if scale[name] > 0 else (0.0 if d == 0 else np.inf)
            if d > 0 and (where is None or s > where.scaled):
                index = tuple(int(i) for i in np.unravel_index(k, r.shape))
                where = Where(t + 1, name, index, float(r.reshape(-1)[k]), float(g.reshape(-1)[k]), d,
                              None if flips.reshape(-1)[k] else float(ulp.reshape(-1)[k]), s, str(r.dtype))
            worst = max(worst, s)
        dev.scaled.append(worst)
        dev.worst.append(where)
    # Keep one line per kind of problem readable: the first few only.
    if len(dev.problems) > 5:
        dev.problems = dev.problems[:5] + [f"... and {len(dev.problems) - 5} more"]
    return dev
