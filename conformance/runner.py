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

import copy
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, TextIO

from dualopt.spec.vectors import Case, load_cases

from .discovery import IMPL_MODULES, Entry, discover, select
from .metrics import Deviation, Where, compare
from .problem import MODES, Problem, make_problem
from .protocol import Implementation, Trajectory, case_id
from .tolerances import NATIVE_CLASSES, Tolerance, judge, numerics_class, tolerance

__all__ = ["Row", "SuiteResult", "Progress", "run_suite", "evaluate_case", "freeze", "CLOSED_PREFIX"]

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
    description: str = ""  # what the case tests (the vector's description, or the closed-loop mode)
    first: Where | None = None  # the first step outside the tolerance, with its worst element

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
    def compared(self) -> int:
        """Comparisons that ran and agreed (exact or pass)."""
        return sum(r.status in ("exact", "pass") for r in self.rows)

    @property
    def verdict(self) -> str:
        """"PASS" only when something was compared and nothing failed; "NOTHING CHECKED" when nothing ran."""
        if self.failed:
            return "FAIL"
        return "PASS" if self.compared else "NOTHING CHECKED"

    @property
    def exit_code(self) -> int:
        """0 for PASS, 1 otherwise (a failure, or nothing compared); 2 is the CLI's, for errors before a run."""
        return 0 if self.verdict == "PASS" else 1


class Progress:
    """Progress lines on one stream, whole lines only, from any thread.

    Each implementation's loop is a task with k/N units; a line is printed when
    a task starts and ends, and every ``interval`` seconds for each running
    task (k/N, elapsed, ETA), so there is never a long silence and lines from
    ``--jobs`` lanes never interleave.
    """

    def __init__(self, stream: TextIO | None, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._lock = threading.Lock()
        self._tasks: dict[int, list[Any]] = {}  # id -> [label, k, n, unit, t0, last line time, note]
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def say(self, msg: str) -> None:
        if self.stream is None:
            return
        with self._lock:
            self.stream.write(msg + "\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        if self.stream is not None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            now = time.perf_counter()
            with self._lock:
                due = [t for t in self._tasks.values() if now - t[5] >= self.interval]
                for t in due:
                    t[5] = now
            for t in due:
                self.say(self._status(t, now))

    @staticmethod
    def _status(t: list[Any], now: float) -> str:
        label, k, n, unit, t0, _, note = t
        elapsed = now - t0
        eta = f"ETA {elapsed / k * (n - k):.0f} s" if 0 < k < n else "ETA -"
        return f"{label}: {k}/{n} {unit}, {elapsed:.0f} s elapsed, {eta}{note}"

    def start(self, label: str, n: int, unit: str, note: str = "") -> int:
        now = time.perf_counter()
        with self._lock:
            key = len(self._tasks) + 1 + max(self._tasks, default=0)
            self._tasks[key] = [label, 0, n, unit, now, now, note]
        self.say(f"{label}: 0/{n} {unit} ...{note}")
        return key

    def advance(self, key: int, k: int) -> None:
        with self._lock:
            self._tasks[key][1] = k

    def finish(self, key: int, summary: str) -> None:
        with self._lock:
            t = self._tasks.pop(key)
        self.say(f"{t[0]}: {t[2]}/{t[2]} {t[3]} in {time.perf_counter() - t[4]:.1f} s: {summary}")


def _counts(rows: Sequence[Row]) -> str:
    parts = [f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES if any(r.status == s for r in rows)]
    return ", ".join(parts) or "nothing"


def evaluate_case(impl_name: str, framework: str, numerics: str, case: Case, traj: Trajectory) -> Row:
    """Compare one replayed case with its vector's expected values and apply the policy."""
    dev = compare(traj, case.expected, case.initial)
    tol = tolerance(numerics, "open", case.dtype)
    v = judge(dev, tol)
    return Row("open", case_id(case), impl_name, framework, numerics, case.dtype, case.steps, v.status, dev, tol,
               v.ratio, v.note, description=case.description, first=v.first)


def _error_note(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}){where}"
    return f"raised {type(exc).__name__}: {exc}{where}"


def _numerics(entry: Entry) -> tuple[str, str | None]:
    if entry.impl is None:
        return "-", None
    try:
        return numerics_class(entry.impl), None
    except ValueError as exc:
        return "-", str(exc)


def freeze(case: Case) -> Case:
    """Make every array of ``case`` read-only (in place) and return it: the suite's own copy is never written."""
    arrays = [*case.initial.values(), *case.anchor.values(),
              *(a for s in case.grads for a in s.values() if a is not None),
              *(a for s in case.expected for a in s.values())]
    for a in arrays:
        a.flags.writeable = False
    return case


def _private(case: Case) -> Case:
    """A writable deep copy for an implementation to do with as it likes."""
    return copy.deepcopy(case)


def _replay_one_by_one(impl: Implementation, cases: Sequence[Case], progress: Progress, task: int,
                       batch: bool) -> Iterator[tuple[Case, Trajectory | None, str | None]]:
    """Every case in order with (trajectory, None) or (None, why it has none); each call gets private copies."""
    if hasattr(impl, "replay_each"):  # an outside port in its own worker process (external.SubprocessReplay)
        by_id = {case_id(c): c for c in cases}
        done = 0
        for cid, traj, error in impl.replay_each([_private(c) for c in cases]):
            done += 1
            progress.advance(task, done)
            yield by_id[cid], traj, error
        return
    if batch:
        # One batch: a worker process per call pays the framework's start-up once (Keras: 5-7 s).
        try:
            results = impl.replay_cases([_private(c) for c in cases])
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: a failure of this implementation
            if isinstance(exc, KeyboardInterrupt):
                raise
            note = f"replay_cases {_error_note(exc)}"
            for c in cases:
                yield c, None, note
            return
        for k, c in enumerate(cases):
            progress.advance(task, k + 1)
            traj = results.get(case_id(c)) if isinstance(results, dict) else None
            yield c, traj, None if traj is not None else "no trajectory returned"
        return
    for k, c in enumerate(cases):
        try:
            results = impl.replay_cases([_private(c)])
            traj = results.get(case_id(c)) if isinstance(results, dict) else None
            error = None if traj is not None else "no trajectory returned"
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            traj, error = None, f"replay_cases {_error_note(exc)}"
        progress.advance(task, k + 1)
        yield c, traj, error


def _run_open(entry: Entry, cases: Sequence[Case], progress: Progress) -> list[Row]:
    cls, cls_error = _numerics(entry)
    base = dict(loop="open", impl=entry.name, framework=entry.framework, numerics=cls)
    if entry.impl is None or cls_error:
        status = "FAIL" if (entry.error or cls_error) else "skipped"
        note = entry.error or cls_error or entry.skip or ""
        rows = [Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status=status, note=note,
                    description=c.description, **base) for c in cases]
        progress.say(f"[open]   {entry.name}: {status} ({note})")
        return rows
    impl = entry.impl
    rows: list[Row] = []
    supported: list[Case] = []
    for c in cases:
        try:
            ok = impl.supports(c)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status="FAIL",
                            note=f"supports() {_error_note(exc)}", description=c.description, **base))
            continue
        if ok:
            supported.append(c)
        else:
            rows.append(Row(case=case_id(c), dtype=c.dtype, steps=c.steps, status="n/a",
                            note="case not supported (" + (", ".join(c.features) or "by this implementation") + ")",
                            description=c.description, **base))
    if not supported and all(r.status == "n/a" for r in rows):
        # A framework's own Adam: closed loop only, nothing to show per vector.
        progress.say(f"[open]   {entry.name}: supports no vector case (closed loop only)")
        return []
    batch = _out_of_process(entry) and not hasattr(impl, "replay_each")
    task = progress.start(f"[open]   {entry.name} ({cls})", len(supported), "cases",
                          " (one batch in a worker process)" if batch else "")
    for c, traj, error in _replay_one_by_one(impl, supported, progress, task, batch):
        cid = case_id(c)
        if error is not None:
            rows.append(Row(case=cid, dtype=c.dtype, steps=c.steps, status="FAIL", note=error,
                            description=c.description, **base))
            continue
        try:
            rows.append(evaluate_case(entry.name, entry.framework, cls, c, traj))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - e.g. malformed trajectory, no tolerance for the class
            rows.append(Row(case=cid, dtype=c.dtype, steps=c.steps, status="FAIL",
                            note=f"comparison {_error_note(exc)}", description=c.description, **base))
    order = {case_id(c): i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r.case])
    progress.finish(task, _counts(rows))
    return rows


def _train_mode(impl: Implementation, problem: Problem, mode: str) -> Trajectory:
    out = impl.train(copy.deepcopy(problem), [mode])
    if not isinstance(out, dict) or mode not in out:
        raise ValueError(f"train() returned no trajectory for mode {mode!r}")
    return out[mode]


def _train(impl: Implementation, problem: Problem, modes: Sequence[str], native: bool, progress: Progress,
           task: int, batch: bool) -> tuple[dict[str, Trajectory], dict[str, str], dict[str, str]]:
    """Train every mode the implementation has: (trajectories, mode -> why it has none, mode -> failure).

    An implementation without a closed loop raises NotImplementedError. A
    framework's own Adam (a native numerics class) trains mode ``none`` only
    and may refuse the others; for any other implementation an exception is a
    failure of that mode, never a quietly missing mode. In-process
    implementations train one mode per call (progress per mode, private
    copies of the problem); a worker-process implementation trains all modes
    in one call.
    """
    trained: dict[str, Trajectory] = {}
    missing: dict[str, str] = {}
    failed: dict[str, str] = {}
    if batch:
        try:
            out = impl.train(copy.deepcopy(problem), list(modes))
            trained = dict(out)
        except NotImplementedError as exc:
            if not (native and "none" in modes and len(modes) > 1):
                return {}, {m: "no closed loop" + (f" ({exc})" if str(exc) else "") for m in modes}, {}
            missing = {m: f"mode not supported (NotImplementedError: {exc})" for m in modes if m != "none"}
            try:
                trained = {"none": _train_mode(impl, problem, "none")}
            except Exception as exc2:  # noqa: BLE001
                failed = {"none": f"train {_error_note(exc2)}"}
        except Exception as exc:  # noqa: BLE001
            if not (native and "none" in modes and len(modes) > 1):
                return {}, {}, {m: f"train {_error_note(exc)}" for m in modes}
            missing = {m: f"mode not supported ({type(exc).__name__}: {exc})" for m in modes if m != "none"}
            try:
                trained = {"none": _train_mode(impl, problem, "none")}
            except Exception as exc2:  # noqa: BLE001
                failed = {"none": f"train {_error_note(exc2)}"}
        progress.advance(task, len(modes))
        return trained, missing, failed
    for k, m in enumerate(modes):
        try:
            trained[m] = _train_mode(impl, problem, m)
        except NotImplementedError as exc:
            if native and m != "none":
                missing[m] = f"mode not supported (NotImplementedError: {exc})"
            else:
                # No closed loop at all (an outside replay, core[torch]): nothing to show for any mode.
                return {}, {mm: "no closed loop" + (f" ({exc})" if str(exc) else "") for mm in modes}, {}
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            if native and m != "none":
                missing[m] = f"mode not supported ({type(exc).__name__}: {exc})"
            else:
                failed[m] = f"train {_error_note(exc)}"
        progress.advance(task, k + 1)
    return trained, missing, failed


def _closed_description(mode: str) -> str:
    return (f"closed loop, mode {mode}: the problem's MLP trained in the framework's own loop; weights after every "
            "epoch against core[numpy] with hand-written backprop")


def _run_closed(entry: Entry, problem: Problem, modes: Sequence[str], reference: dict[str, Trajectory],
                progress: Progress) -> list[Row]:
    cls, cls_error = _numerics(entry)
    base = dict(loop="closed", impl=entry.name, framework=entry.framework, numerics=cls, dtype="float64",
                steps=problem.epochs)
    if entry.impl is None or cls_error:
        status = "FAIL" if (entry.error or cls_error) else "skipped"
        return [Row(case=CLOSED_PREFIX + m, status=status, note=entry.error or cls_error or entry.skip or "",
                    description=_closed_description(m), **base) for m in modes]
    if getattr(entry.impl, "train", None) is None or hasattr(entry.impl, "replay_each"):
        return []  # an outside replay port: open loop only
    batch = _out_of_process(entry)
    task = progress.start(f"[closed] {entry.name} ({cls})", len(modes), "modes",
                          " (one batch in a worker process)" if batch else "")
    trained, missing, failed = _train(entry.impl, problem, modes, cls in NATIVE_CLASSES, progress, task, batch)
    rows = []
    for m in modes:
        desc = _closed_description(m)
        if m in failed:
            rows.append(Row(case=CLOSED_PREFIX + m, status="FAIL", note=failed[m], description=desc, **base))
        elif m in trained:
            dev = compare(trained[m], reference[m], problem.weights)
            tol = tolerance(cls, "closed", "float64")
            v = judge(dev, tol)
            rows.append(Row(case=CLOSED_PREFIX + m, status=v.status, dev=dev, tol=tol, ratio=v.ratio, note=v.note,
                            description=desc, first=v.first, **base))
        elif (m in missing and missing[m].startswith("no closed loop")) or cls in NATIVE_CLASSES:
            continue  # core[torch] (no closed loop), a native Adam outside mode none: nothing to show
        else:
            rows.append(Row(case=CLOSED_PREFIX + m, status="n/a", note=missing.get(m, "mode not returned"),
                            description=desc, **base))
    progress.finish(task, _counts(rows) if rows else "no closed loop")
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
              progress: TextIO | None = sys.stderr, jobs: int = 1, interval: float = 10.0) -> SuiteResult:
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
    interval : float
        Seconds between progress lines of a running implementation (k/N, elapsed, ETA).

    Every implementation gets its own writable copies of the cases and of the
    problem; the suite judges against its own read-only copies, so nothing an
    implementation does to its inputs can change another's verdict or its own.
    """
    t_start = time.perf_counter()
    result = SuiteResult(config=dict(backends=list(backends) if backends is not None else None, dtypes=list(dtypes),
                                     only=only, modes=list(modes), jobs=jobs))
    entries = select(discover(modules, package=package), backends) + list(discover([], extra=extra))
    result.entries = entries
    if cases is None:
        cases = [c for c in load_cases() if c.dtype in dtypes]
    cases = [freeze(copy.deepcopy(c)) for c in cases]
    result.cases = [case_id(c) for c in cases]
    with Progress(progress, interval) as prog:
        _run_all(result, entries, cases, only, dtypes, problem, modes, prog, jobs)
    result.wall_s = time.perf_counter() - t_start
    return result


def _run_all(result: SuiteResult, entries: list[Entry], cases: list[Case], only: str | None, dtypes: Sequence[str],
             problem: Problem | None, modes: Sequence[str], progress: Progress, jobs: int) -> None:
    progress.say(f"dualopt conformance: {len(entries)} implementations, {len(cases)} vector cases, {jobs} jobs")
    reference: dict[str, Trajectory] = {}
    run_closed = only in (None, "closed") and "float64" in dtypes
    if run_closed:
        from .impl_core import train_reference

        problem = problem or make_problem()
        t0 = time.perf_counter()
        reference = {m: train_reference(problem, m) for m in modes}
        result.timings["closed/reference"] = time.perf_counter() - t0
        result.closed_cases = [CLOSED_PREFIX + m for m in modes]
        progress.say(f"[closed] reference core[numpy] (hand backprop): {len(modes)} modes x {problem.epochs} epochs "
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
