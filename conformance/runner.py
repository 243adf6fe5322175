"""Run the suite: open loop (every vector through every implementation) and closed loop (the MLP).

Results are :class:`Row` objects, one per (case, implementation); progress goes
to ``stderr`` as each implementation finishes a loop.

Examples
--------
>>> res = run_suite(backends=["numpy"], dtypes=["float64"], only="open", progress=None)
>>> {r.status for r in res.rows}, res.failed
({'exact'}, 0)
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

from dualopt.spec.vectors import Case, load_cases

from .discovery import IMPL_MODULES, Entry, discover, select
from .metrics import Deviation, compare
from .problem import MODES, Problem, make_problem
from .protocol import Implementation, Trajectory, case_id
from .tolerances import NATIVE_CLASSES, Tolerance, judge, numerics_class, tolerance

__all__ = ["Row", "SuiteResult", "run_suite", "evaluate_case", "CLOSED_PREFIX"]

CLOSED_PREFIX = "closed:"
STATUSES = ("exact", "pass", "FAIL", "n/a", "skipped")


@dataclass
class Row:
    """One implementation on one case (open loop: a vector file; closed loop: ``closed:<mode>``)."""

    loop: str
    case: str
    impl: str
    framework: str
    numerics: str
    dtype: str
    steps: int
    status: str  # one of STATUSES
    dev: Deviation | None = None
    tol: Tolerance | None = None
    ratio: float = 0.0
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class SuiteResult:
    rows: list[Row] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    closed_cases: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _say(progress: TextIO | None, msg: str) -> None:
    if progress is not None:
        print(msg, file=progress, flush=True)


def _counts(rows: Sequence[Row]) -> str:
    parts = [f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES if any(r.status == s for r in rows)]
    return ", ".join(parts) or "nothing"


def evaluate_case(impl_name: str, framework: str, numerics: str, case: Case, traj: Trajectory) -> Row:
    """Compare one replayed case with its vector's expected values and apply the policy."""
    dev = compare(traj, case.expected, case.initial)
    tol = tolerance(numerics, "open", case.dtype)
    v = judge(dev, tol)
    return Row("open", case_id(case), impl_name, framework, numerics, case.dtype, case.steps, v.status, dev, tol,
               v.ratio, v.note)


def _error_note(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"raised {type(exc).__name__}: {exc}{where}"


def _numerics(entry: Entry) -> tuple[str, str | None]:
    if entry.impl is None:
        return "-", None
    try:
        return numerics_class(entry.impl), None
    except ValueError as exc:
        return "-", str(exc)


def _run_open(entry: Entry, cases: Sequence[Case], progress: TextIO | None) -> list[Row]:
    cls, cls_error = _numerics(entry)
    base = dict(loop="open", impl=entry.name, framework=entry.framework, numerics=cls)
    if entry.impl is None or cls_error:
        status = "FAIL" if (entry.error or cls_error) else "skipped"
        note = entry.error or cls_error or entry.skip or ""
        rows = [Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status=status, note=note, **base) for c in cases]
        _say(progress, f"[open]   {entry.name}: {status} ({note})")
        return rows
    impl = entry.impl
    rows: list[Row] = []
    supported: list[Case] = []
    for c in cases:
        try:
            ok = impl.supports(c)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status="FAIL",
                            note=f"supports() {_error_note(exc)}", **base))
            continue
        if ok:
            supported.append(c)
        else:
            rows.append(Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status="n/a",
                            note="case not supported (" + (", ".join(c.features) or "by this implementation") + ")",
                            **base))
    if not supported and all(r.status == "n/a" for r in rows):
        # A framework's own Adam: closed loop only, nothing to show per vector.
        _say(progress, f"[open]   {entry.name}: supports no vector case (closed loop only)")
        return []
    _say(progress, f"[open]   {entry.name} ({cls}): replaying {len(supported)} cases ...")
    t0 = time.perf_counter()
    try:
        results = impl.replay_cases(supported) if supported else {}
    except Exception as exc:  # noqa: BLE001
        note = f"replay_cases {_error_note(exc)}"
        rows += [Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status="FAIL", note=note, **base) for c in supported]
        _say(progress, f"[open]   {entry.name}: FAIL ({note})")
        return rows
    for c in supported:
        cid = case_id(c)
        if cid not in results:
            rows.append(Row(case=cid, dtype=c.dtype, steps=c.steps, status="FAIL", note="no trajectory returned", **base))
            continue
        try:
            rows.append(evaluate_case(entry.name, entry.framework, cls, c, results[cid]))
        except Exception as exc:  # noqa: BLE001 - e.g. malformed trajectory, no tolerance for the class
            rows.append(Row(case=cid, dtype=c.dtype, steps=c.steps, status="FAIL",
                            note=f"comparison {_error_note(exc)}", **base))
    order = {case_id(c): i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r.case])
    _say(progress, f"[open]   {entry.name}: {_counts(rows)} in {time.perf_counter() - t0:.1f} s")
    return rows


def _train(impl: Implementation, problem: Problem, modes: Sequence[str], native: bool) -> tuple[dict[str, Trajectory], dict[str, str]]:
    """Train every mode the implementation has; returns (trajectories, mode -> reason it has none).

    An implementation without a closed loop raises NotImplementedError. A
    framework's own Adam (a native numerics class) trains mode ``none`` only
    and may refuse the others; for any other implementation an exception is a
    failure, never a quietly missing mode.
    """
    try:
        return dict(impl.train(problem, list(modes))), {}
    except NotImplementedError as exc:
        first: Exception = exc
        if not (native and "none" in modes and len(modes) > 1):
            return {}, {m: "no closed loop" + (f" ({exc})" if str(exc) else "") for m in modes}
    except Exception as exc:  # noqa: BLE001
        if not (native and "none" in modes and len(modes) > 1):
            raise
        first = exc
    out = dict(impl.train(problem, ["none"]))  # the degenerate comparison only
    return out, {m: f"mode not supported ({type(first).__name__}: {first})" for m in modes if m != "none"}


def _run_closed(entry: Entry, problem: Problem, modes: Sequence[str], reference: dict[str, Trajectory],
                progress: TextIO | None) -> list[Row]:
    cls, cls_error = _numerics(entry)
    base = dict(loop="closed", impl=entry.name, framework=entry.framework, numerics=cls, dtype="float64",
                steps=problem.epochs)
    if entry.impl is None or cls_error:
        status = "FAIL" if (entry.error or cls_error) else "skipped"
        return [Row(case=CLOSED_PREFIX + m, status=status, note=entry.error or cls_error or entry.skip or "", **base)
                for m in modes]
    _say(progress, f"[closed] {entry.name} ({cls}): training {', '.join(modes)} ...")
    t0 = time.perf_counter()
    try:
        trained, missing = _train(entry.impl, problem, modes, native=cls in NATIVE_CLASSES)
    except Exception as exc:  # noqa: BLE001
        note = f"train {_error_note(exc)}"
        _say(progress, f"[closed] {entry.name}: FAIL ({note})")
        return [Row(case=CLOSED_PREFIX + m, status="FAIL", note=note, **base) for m in modes]
    rows = []
    for m in modes:
        if m in trained:
            dev = compare(trained[m], reference[m], problem.weights)
            tol = tolerance(cls, "closed", "float64")
            v = judge(dev, tol)
            rows.append(Row(case=CLOSED_PREFIX + m, status=v.status, dev=dev, tol=tol, ratio=v.ratio, note=v.note, **base))
        elif (m in missing and missing[m].startswith("no closed loop")) or cls in NATIVE_CLASSES:
            continue  # core[torch] (no closed loop), a native Adam outside mode none: nothing to show
        else:
            rows.append(Row(case=CLOSED_PREFIX + m, status="n/a", note=missing.get(m, "mode not returned"), **base))
    if rows:
        _say(progress, f"[closed] {entry.name}: {_counts(rows)} in {time.perf_counter() - t0:.1f} s")
    else:
        _say(progress, f"[closed] {entry.name}: no closed loop")
    return rows


def _out_of_process(entry: Entry) -> bool:
    """Does this implementation do its work in a subprocess (so it can overlap with in-process work)?"""
    declared = getattr(entry.impl, "out_of_process", None)
    return bool(declared) if declared is not None else entry.module == "impl_keras"


def run_suite(*, backends: Sequence[str] | None = None, dtypes: Sequence[str] = ("float64", "float32"),
              only: str | None = None, modules: Sequence[str] = tuple(IMPL_MODULES),
              package: str = "dualopt.conformance",
              extra: Sequence[Implementation] = (), cases: Sequence[Case] | None = None,
              problem: Problem | None = None, modes: Sequence[str] = MODES,
              progress: TextIO | None = sys.stderr, jobs: int = 1) -> SuiteResult:
    """Run the conformance suite and return every row.

    Parameters
    ----------
    backends : sequence of str, optional
        Keep implementations whose framework matches one of these names
        (``"torch"``, ``"keras"``, ``"jax"``, ``"core"``, ``"numpy"``, a full
        framework string such as ``"keras[tensorflow]"``, or an implementation's
        name). ``None`` keeps all. Implementations passed in ``extra`` are always kept.
    dtypes : sequence of str
        Vector dtypes to replay. The closed loop is float64 and runs when
        ``"float64"`` is among them.
    only : {"open", "closed"}, optional
        Run one loop only.
    modules : sequence of str
        Implementation modules to discover in ``package``.
    package : str
        Where the implementation modules live (``dualopt.conformance``).
    extra : sequence of Implementation
        Further implementations (e.g. an external ``replay`` callable).
    cases, problem, modes
        Override the vectors, the closed-loop problem or its modes (tests).
    progress : file or None
        Where progress lines go.
    jobs : int
        How many implementations run at the same time (threads; Keras workers are subprocesses).
    """
    t_start = time.perf_counter()
    result = SuiteResult(config=dict(backends=list(backends) if backends is not None else None, dtypes=list(dtypes),
                                     only=only, modes=list(modes), jobs=jobs))
    entries = select(discover(modules, package=package), backends) + list(discover([], extra=extra))
    result.entries = entries
    if cases is None:
        cases = [c for c in load_cases() if c.dtype in dtypes]
    result.cases = [case_id(c) for c in cases]
    _say(progress, f"dualopt conformance: {len(entries)} implementations, {len(cases)} vector cases, {jobs} jobs")
    reference: dict[str, Trajectory] = {}
    run_closed = only in (None, "closed") and "float64" in dtypes
    if run_closed:
        from .impl_core import train_reference

        problem = problem or make_problem()
        t0 = time.perf_counter()
        reference = {m: train_reference(problem, m) for m in modes}
        result.timings["closed/reference"] = time.perf_counter() - t0
        result.closed_cases = [CLOSED_PREFIX + m for m in modes]
        _say(progress, f"[closed] reference core[numpy] (hand backprop): {len(modes)} modes x {problem.epochs} epochs "
                       f"in {time.perf_counter() - t0:.1f} s")

    def run_entry(entry: Entry) -> tuple[list[Row], list[Row], dict[str, float]]:
        open_rows: list[Row] = []
        closed_rows: list[Row] = []
        timings = {}
        if only in (None, "open"):
            t0 = time.perf_counter()
            open_rows = _run_open(entry, cases, progress)
            timings[f"open/{entry.name}"] = time.perf_counter() - t0
        if run_closed:
            t0 = time.perf_counter()
            closed_rows = _run_closed(entry, problem, modes, reference, progress)
            timings[f"closed/{entry.name}"] = time.perf_counter() - t0
        return open_rows, closed_rows, timings

    # Implementations that work in subprocesses (Keras: one per backend) leave this
    # process idle, while the in-process ones hold the GIL. With two or more jobs the
    # subprocess ones get their own lanes (threads), so they overlap with in-process
    # work instead of competing with it. Rows are kept in entry order, so the report
    # does not depend on the schedule.
    remote = [i for i, e in enumerate(entries) if _out_of_process(e)]
    local = [i for i in range(len(entries)) if i not in remote]
    if jobs <= 1 or not remote or not local:
        lanes = [[i] for i in range(len(entries))] if jobs > 1 else [list(range(len(entries)))]
    else:
        lanes = [remote[k::jobs - 1] for k in range(jobs - 1)] + [local]
    outcome: dict[int, tuple[list[Row], list[Row], dict[str, float]]] = {}

    def run_lane(lane: list[int]) -> None:
        for i in lane:
            outcome[i] = run_entry(entries[i])

    if len(lanes) == 1:
        run_lane(lanes[0])
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(run_lane, lane) for lane in lanes]:
                f.result()
    for i in range(len(entries)):
        result.rows += outcome[i][0]
        result.timings.update(outcome[i][2])
    for i in range(len(entries)):
        result.rows += outcome[i][1]
    result.wall_s = time.perf_counter() - t_start
    return result
