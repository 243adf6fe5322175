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

import copy
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, Iterator, Sequence

import numpy as np

from dualopt.spec.vectors import Case, load_case, vector_files

from .problem import Problem
from .protocol import Trajectory, case_id
from .runner import Row, evaluate_case
from .tolerances import REPLAY_CLASSES

__all__ = ["ReplayFn", "ReplayImplementation", "SubprocessReplay", "DEFAULT_REPLAY_TIMEOUT", "check_case",
           "pytest_suite", "vector_paths"]

ReplayFn = Callable[[Case], Trajectory]


def _finish(check_only: bool, check_result: tuple[str, Any], cases: list[int], reason: str) -> Iterator[tuple[str, Any]]:
    """End a replay: a check-only run reports ``check_result``; a full run fails each case left in ``cases``."""
    if check_only:
        yield check_result
        return
    for i in cases:
        yield "case", (i, None, reason)


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
        if numerics not in REPLAY_CLASSES:
            raise ValueError(f"numerics={numerics!r} is invalid: expected one of {REPLAY_CLASSES}.")
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
        # The replay gets its own copy: what it does to it cannot change the expected values it is judged by.
        traj = impl.replay(copy.deepcopy(case))
    except Exception as exc:  # noqa: BLE001 - a crash is a failed case, reported like one
        return Row("open", case_id(case), name, impl.framework, numerics, case.dtype, case.steps, "FAIL",
                   note=f"replay raised {type(exc).__name__}: {exc}", description=case.description)
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

    if numerics not in REPLAY_CLASSES:
        raise ValueError(f"numerics={numerics!r} is invalid: expected one of {REPLAY_CLASSES}.")
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


#: Seconds a --replay port may take per case (the first also covers importing it); --replay-timeout changes it.
DEFAULT_REPLAY_TIMEOUT = 60.0


class SubprocessReplay:
    """A ``MODULE:FUNCTION`` replay port run in its own subprocess, one case after another.

    Each case reaches the port as a private copy (pickled into the worker), so
    a port that steps the arrays in place or overwrites ``case.expected``
    changes nothing the suite judges. A case that raises (``SystemExit``
    included), returns something that is not a trajectory of numeric arrays,
    kills the worker or runs past ``timeout`` seconds fails with that reason;
    the worker is then restarted for the remaining cases.

    Parameters
    ----------
    spec : str
        ``"module:function"``; the module is imported as ``python -m`` would,
        with ``directory`` first on the path (when no other user can write there).
    numerics : str
        Tolerance class, one of :data:`~dualopt.conformance.tolerances.REPLAY_CLASSES`.
    timeout : float
        Seconds per case.
    directory : str, optional
        Where to import the module from (default: the current directory).
    """

    out_of_process = True
    framework = "external"

    def __init__(self, spec: str, *, numerics: str = "exact", timeout: float = DEFAULT_REPLAY_TIMEOUT,
                 directory: str | None = None) -> None:
        from .tolerances import REPLAY_CLASSES

        module, sep, func = spec.partition(":")
        if not sep or not module or not func:
            raise ValueError(f"--replay={spec!r} is invalid: expected MODULE:FUNCTION")
        if numerics not in REPLAY_CLASSES:
            raise ValueError(f"numerics={numerics!r} is invalid for a replay: expected one of {REPLAY_CLASSES} "
                             "(the native classes describe a framework's own Adam, which has no open loop)")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r} is invalid: expected seconds > 0")
        self.spec = spec
        self.name = f"{func} ({module})"
        self.numerics = numerics
        self.timeout = float(timeout)
        self.directory = os.getcwd() if directory is None else directory

    def unavailable(self) -> str | None:
        return None

    def supports(self, case: Case) -> bool:
        return True

    def check(self) -> str | None:
        """Import the port in a worker without replaying anything: None if it loads, else why not."""
        for event, payload in self._events([], check_only=True):
            if event == "ready":
                return None
            return payload
        return "the worker ended without a word"

    def replay_each(self, cases: Sequence[Case]) -> Iterator[tuple[str, Trajectory | None, str | None]]:
        """Replay ``cases`` in order, yielding ``(case id, trajectory or None, why it failed or None)`` per case."""
        ids = [case_id(c) for c in cases]
        for event, payload in self._events(list(cases)):
            if event == "case":
                i, traj, error = payload
                yield ids[i], traj, error

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        out: dict[str, Trajectory] = {}
        for cid, traj, error in self.replay_each(cases):
            if error is not None:
                raise RuntimeError(f"{cid}: {error}")
            out[cid] = traj  # type: ignore[assignment]
        return out

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        raise NotImplementedError("an external replay function has no closed loop")

    def _events(self, cases: list[Case], *, check_only: bool = False) -> Iterator[tuple[str, Any]]:
        """("ready", None), ("case", (i, traj, error)) per case, or (kind, reason) when the port cannot load."""
        with tempfile.TemporaryDirectory(prefix="dualopt-replay-") as tmp_name:
            tmp = Path(tmp_name)
            pending = list(range(len(cases)))
            seen: set[int] = set()
            attempt = 0
            while pending or check_only:
                attempt += 1
                out = tmp / f"out{attempt}"
                out.mkdir()
                job = tmp / f"job{attempt}.pkl"
                job.write_bytes(pickle.dumps(dict(spec=self.spec, directory=self.directory, check_only=check_only,
                                                  cases=[(i, cases[i]) for i in pending])))
                with open(tmp / f"stderr{attempt}", "w+b") as err:
                    outcome = yield from self._run_worker(job, out, err, check_only, seen)
                    tail = _tail(err)
                kind, current, reason = outcome
                if kind == "ready" or kind == "end":
                    yield from _finish(check_only, ("ready", None), [i for i in pending if i not in seen],
                                       "no result returned")
                    return
                if kind == "import":
                    yield from _finish(check_only, ("import", reason), pending, reason)
                    return
                pending = [i for i in pending if i not in seen]
                why = reason + (f"; stderr: {tail}" if tail else "")
                if current is None or check_only:
                    # The worker died outside a case (at start-up): the same would happen again.
                    yield from _finish(check_only, ("died", why), pending, why)
                    return
                yield "case", (current, None, why)
                pending = [i for i in pending if i != current]

    def _run_worker(self, job: Path, out: Path, err: BinaryIO, check_only: bool, seen: set[int]) -> Generator[
            tuple[str, Any], None, tuple[str, int | None, str]]:
        """Run one worker; yield finished cases; return (how it ended, case in flight, reason)."""
        proc = subprocess.Popen([sys.executable, "-m", "dualopt.conformance._replay_worker", str(job), str(out)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        current: int | None = None
        try:
            while True:
                try:
                    line = lines.get(timeout=self.timeout)
                except queue.Empty:
                    what = f"case {current + 1}" if current is not None else "start-up (importing the port)"
                    return "timeout", current, (f"no result within {self.timeout:g} s ({what}); killed "
                                                "(raise the limit with --replay-timeout)")
                if line is None:
                    code = proc.wait()
                    return "died", current, f"the port's worker process exited with code {code} mid-run"
                word, _, rest = line.partition(" ")
                if word == "ready":
                    if check_only:
                        return "ready", None, ""
                elif word == "import":
                    return "import", None, f"cannot load {self.spec}: {json.loads(rest)}"
                elif word == "start" and rest.isdigit():
                    current = int(rest)
                elif word == "done" and rest.isdigit() and int(rest) not in seen:
                    i = int(rest)
                    traj, error = _load_result(out, i)
                    seen.add(i)
                    yield "case", (i, traj, error)
                    current = None
                elif word == "end":
                    return "end", None, ""
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _tail(f: BinaryIO, limit: int = 600) -> str:
    f.flush()
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    text = f.read().decode("utf-8", "replace").strip()
    return (" ".join(text.splitlines()[-4:]))[-limit:]


def _load_result(out: Path, i: int) -> tuple[Trajectory | None, str | None]:
    """A worker's result for case ``i``: JSON names plus an .npz read without pickle."""
    try:
        meta = json.loads((out / f"{i}.json").read_text())
        if "error" in meta:
            return None, str(meta["error"])
        with np.load(out / f"{i}.npz", allow_pickle=False) as z:
            return [{n: np.array(z[f"s{t}_{j}"]) for j, n in enumerate(step)}
                    for t, step in enumerate(meta["names"])], None
    except Exception as exc:  # noqa: BLE001 - a garbled result is that case's failure
        return None, f"unreadable result ({type(exc).__name__}: {exc})"
