"""What an implementation provides to the conformance suite.

Each ``conformance/impl_<framework>.py`` module exposes ``implementations()``
returning a list of objects that satisfy :class:`Implementation`. The suite
never imports a framework itself; an implementation whose framework is not
installed reports it through :meth:`Implementation.unavailable` and is shown
as *skipped*, never as passed.

Results are plain numpy arrays in the case's dtype (open loop) or float64
(closed loop), keyed by tensor name. Closed-loop weights use the layout of
:mod:`dualopt.conformance.problem` (kernels ``(in, out)``).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from dualopt.spec.vectors import Case

from .problem import Problem

Trajectory = list[dict[str, np.ndarray]]
"""Parameters after each step (open loop) or after each epoch (closed loop)."""


@runtime_checkable
class Implementation(Protocol):
    name: str  # e.g. "torch DualOpt (foreach)"; unique in the report
    framework: str  # e.g. "torch", "jax", "keras[tensorflow]", "core[numpy]"

    def unavailable(self) -> str | None:
        """None when it can run here, else the reason it is skipped (e.g. 'tensorflow not installed')."""

    def supports(self, case: Case) -> bool:
        """False for a case whose features it cannot express (e.g. 'missing_grads' in Optax)."""

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        """Open loop: replay every case; map case file id ``f"{case.name}.{case.dtype}"`` to its trajectory.

        Batching all cases in one call lets an implementation that lives in a
        subprocess (one Keras backend per process) pay its start-up once.
        """

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        """Closed loop: train the problem's MLP in the framework's ordinary loop, once per mode
        (see :func:`dualopt.conformance.problem.group_hyperparams`), float64; return the weights
        after every epoch. Raise NotImplementedError if this implementation has no closed loop."""


def case_id(case: Case) -> str:
    return f"{case.name}.{case.dtype}"


def c_kernel_unavailable() -> str | None:
    """Why a C-kernel row is skipped, decided without importing a framework (discovery must not): kernels
    turned off or no compiler. A compiler whose build then fails is an error of that row, not a skip."""
    from dualopt.native._build import unavailable

    why = unavailable()
    return None if why is None else f"C kernel: {why}"
