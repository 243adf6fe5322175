"""Run the suite against an implementation that lives outside this repository (MLX, C++, ...).

An outside implementation provides one function::

    def replay(case: dualopt.spec.vectors.Case) -> list[dict[str, numpy.ndarray]]

that creates a fresh optimizer over ``case.initial`` (with ``case.anchor`` as the
explicit finetune anchors), applies ``case.grads[k]`` at learning rate
``case.lr[k]`` for every step ``k`` (a ``None`` gradient means the tensor has no
gradient in that step), and returns the parameters after every step, keyed by
tensor name, as numpy arrays of ``case.dtype``. See ``conformance/README.md``.

Then, in the implementer's own test suite::

    # test_dualopt_conformance.py
    from dualopt.conformance.external import pytest_suite
    from mylib import replay

    test_dualopt = pytest_suite(replay, "mylib")

or from the command line: ``python -m dualopt.conformance --backends none --replay mylib:replay``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from dualopt.spec.vectors import Case, load_case, vector_files

from .problem import Problem
from .protocol import Trajectory, case_id
from .runner import Row, evaluate_case
from .tolerances import CLASSES

__all__ = ["ReplayFn", "ReplayImplementation", "check_case", "pytest_suite", "vector_paths"]

ReplayFn = Callable[[Case], Trajectory]


class ReplayImplementation:
    """A plain ``replay(case) -> trajectory`` function as an :class:`~dualopt.conformance.protocol.Implementation`.

    Parameters
    ----------
    replay : callable
        ``replay(case)`` returning the parameters after every step.
    name : str
        Shown in the report.
    framework : str
        Shown in the report (default ``"external"``).
    numerics : str
        Tolerance class from ``spec/TOLERANCES.md`` (default ``"exact"``: bitwise).
    supports : callable, optional
        ``supports(case) -> bool``; False marks a case n/a (e.g. a feature the
        implementation cannot express).

    Examples
    --------
    >>> from dualopt.conformance.impl_core import replay_reference
    >>> impl = ReplayImplementation(replay_reference, "numpy core as a function")
    >>> impl.numerics, impl.unavailable()
    ('exact', None)
    """

    def __init__(self, replay: ReplayFn, name: str, *, framework: str = "external", numerics: str = "exact",
                 supports: Callable[[Case], bool] | None = None) -> None:
        if not callable(replay):
            raise TypeError(f"replay={replay!r} is invalid: expected a callable replay(case) -> trajectory.")
        if numerics not in CLASSES:
            raise ValueError(f"numerics={numerics!r} is invalid: expected one of {tuple(CLASSES)}.")
        self.replay = replay
        self.name = name
        self.framework = framework
        self.numerics = numerics
        self._supports = supports

    def unavailable(self) -> str | None:
        return None

    def supports(self, case: Case) -> bool:
        return True if self._supports is None else bool(self._supports(case))

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return {case_id(c): self.replay(c) for c in cases}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        raise NotImplementedError("an external replay function has no closed loop")


def check_case(replay: ReplayFn, case: Case, *, name: str = "external", numerics: str = "exact") -> Row:
    """Replay one case and judge it; the returned row's ``status`` is ``"exact"``, ``"pass"`` or ``"FAIL"``.

    Examples
    --------
    >>> from dualopt.spec import VECTORS_DIR
    >>> from dualopt.conformance.impl_core import replay_reference
    >>> check_case(replay_reference, load_case(VECTORS_DIR / "adam_none.float32.json")).status
    'exact'
    """
    impl = ReplayImplementation(replay, name, numerics=numerics)
    try:
        traj = impl.replay(case)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed case, reported like one
        return Row("open", case_id(case), name, impl.framework, numerics, case.dtype, case.steps, "FAIL",
                   note=f"replay raised {type(exc).__name__}: {exc}")
    return evaluate_case(name, impl.framework, numerics, case, traj)


def vector_paths(directory: str | Path | None = None, dtypes: Sequence[str] = ("float64", "float32")) -> list[Path]:
    """The vector files the suite replays (sorted), optionally only some dtypes."""
    from dualopt.spec import VECTORS_DIR

    # Files are <name>.<dtype>.json; vector_files leaves out the JSON Schema.
    return [p for p in vector_files(directory or VECTORS_DIR) if p.name.split(".")[-2] in dtypes]


def _describe(row: Row) -> str:
    d = row.dev
    if d is None:
        return f"{row.case}: {row.status} {row.note}"
    return (f"{row.case} [{row.impl}, class {row.numerics}]: {row.status}; max abs err {d.max_abs:.3g}, "
            f"max rel err {d.max_rel:.3g}, max ulp {d.max_ulp:.0f}, err/tol {row.ratio:.3g} "
            f"(tolerance {row.tol.describe() if row.tol else '-'}) {row.note}")


def pytest_suite(replay: ReplayFn, name: str, *, numerics: str = "exact", dtypes: Sequence[str] = ("float64", "float32"),
                 supports: Callable[[Case], bool] | None = None, vectors_dir: str | Path | None = None) -> Any:
    """A pytest test function parametrized over every vector file; assign it to a ``test_*`` name.

    Each test replays one case and fails with the case's table row when the
    result is outside the tolerance of ``numerics``; a case for which
    ``supports`` returns False is skipped.

    Examples
    --------
    >>> from dualopt.conformance.impl_core import replay_reference
    >>> test_numpy_core = pytest_suite(replay_reference, "numpy core")
    >>> len(test_numpy_core.pytestmark[0].args[1]) > 0
    True
    """
    import pytest

    if numerics not in CLASSES:
        raise ValueError(f"numerics={numerics!r} is invalid: expected one of {tuple(CLASSES)}.")
    paths = vector_paths(vectors_dir, dtypes)
    if not paths:
        raise ValueError(f"vectors_dir={vectors_dir!r} is invalid: expected a directory holding *.json test vectors.")

    @pytest.mark.parametrize("vector", paths, ids=[p.stem for p in paths])
    def test_dualopt_conformance(vector: Path) -> None:
        case = load_case(vector)
        if supports is not None and not supports(case):
            pytest.skip(f"{name} does not support {case_id(case)} (features: {', '.join(case.features) or '-'})")
        row = check_case(replay, case, name=name, numerics=numerics)
        assert row.status in ("exact", "pass"), _describe(row)


    return test_dualopt_conformance
