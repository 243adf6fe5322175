"""``python -m dualopt.conformance`` (console script ``dualopt-conformance``).

Prints one table per case, the failures and the aggregate on stdout, progress
on stderr, and writes ``conformance.{md,json,png}`` into ``--report``.

Exit status: 0 when at least one implementation ran and every comparison
passed; 1 when any comparison failed (or, run through the API, nothing was
compared); 2 for a usage or setup error found before the run (unknown backend
name, empty selection, unusable report directory, invalid numerics class for
a replay, a replay port that cannot be imported, malformed vector files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from dualopt.spec import VECTORS_DIR
from dualopt.spec.vectors import Case, VectorFormatError, load_case, vector_files

from .discovery import IMPL_MODULES, Entry, discover, select, tokens
from .external import DEFAULT_REPLAY_TIMEOUT, SubprocessReplay

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dualopt.conformance",
        description="Replay the spec's test vectors through every installed DualOpt implementation (open loop), "
                    "train the same MLP in every framework (closed loop), and compare with the reference core.")
    p.add_argument("--backends", metavar="NAMES", default=None,
                   help="comma-separated framework names to keep, e.g. 'torch,keras' or 'core' or 'numpy' or "
                        "'keras[tensorflow]' (a name matches every implementation that involves it: 'torch' keeps "
                        "torch, core[torch] and keras[torch]); 'none' keeps none (with --replay); an unknown name "
                        "is an error that lists the valid ones; default: all")
    p.add_argument("--dtype", choices=("float64", "float32", "all"), default="all",
                   help="vector dtype(s) to replay; the closed loop is float64 and runs unless --dtype float32")
    p.add_argument("--only", choices=("open", "closed"), default=None, help="run one loop only")
    p.add_argument("--report", metavar="DIR", default="reports/conformance",
                   help="directory for conformance.md/.json/.png (default: reports/conformance); '' to skip")
    p.add_argument("--replay", metavar="MODULE:FUNCTION", action="append", default=[],
                   help="also test an external implementation: a function replay(case) -> trajectory "
                        "(see conformance/README.md); repeatable")
    p.add_argument("--replay-numerics", default="exact", metavar="CLASS",
                   help="tolerance class of the --replay implementations: exact, torch, xla-jit or traced-scalars "
                        "(default: exact; see spec/TOLERANCES.md)")
    p.add_argument("--replay-timeout", type=float, default=DEFAULT_REPLAY_TIMEOUT, metavar="SECONDS",
                   help=f"seconds a --replay port may take per case before it is killed and the case fails "
                        f"(default: {DEFAULT_REPLAY_TIMEOUT:g}); each port runs in its own process")
    p.add_argument("--vectors", metavar="DIR", default=str(VECTORS_DIR),
                   help="directory of vector files (default: the spec's); every file is validated before the run")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="implementations run at the same time (default: min(2, CPUs)); 1 runs them one by one")
    p.add_argument("--quiet", action="store_true", help="print only the aggregate table and the summary line")
    p.add_argument("--list", action="store_true", help="list the implementations found and exit")
    return p


class UsageError(Exception):
    """An error found before the run: exit status 2 with this message."""


def _fail(msg: str) -> int:
    print(f"dualopt conformance: error: {msg}", file=sys.stderr)
    return 2


def _check_report_dir(directory: str) -> None:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"--report={directory!r} is unusable: {exc.strerror or exc} (the report could not be "
                         "written there; pick a writable directory, or --report '' for none)") from None


def _backends(spec: str | None, entries: Sequence[Entry]) -> list[str] | None:
    """The --backends names, each checked against the implementations found (``none``: none of them)."""
    if spec is None:
        return None
    names = [b.strip() for b in spec.split(",") if b.strip()]
    if not names:
        raise UsageError(f"--backends={spec!r} names nothing")
    valid = set()
    for e in entries:
        valid |= tokens(e.framework, e.module) | {e.name.lower()}
    unknown = [b for b in names if b.lower() != "none" and b.lower().replace("-", "_") not in
               {v.replace("-", "_") for v in valid}]
    if unknown:
        raise UsageError(f"--backends: unknown name(s) {', '.join(map(repr, unknown))}; valid names: "
                         + ", ".join(sorted(valid | {"none"})))
    return [b for b in names if b.lower() != "none"]


def _load_cases(directory: str, dtypes: Sequence[str]) -> list[Case]:
    files = vector_files(directory)
    if not files:
        raise UsageError(f"--vectors={directory!r} holds no vector files (*.json)")
    try:
        cases = [load_case(p) for p in files]  # every file is validated, whatever --dtype keeps
    except VectorFormatError as exc:
        raise UsageError(f"malformed test vectors: {exc}") from None
    return [c for c in cases if c.dtype in dtypes]


def _prepare(args: argparse.Namespace) -> tuple[list[str] | None, list[SubprocessReplay], list[Case] | None]:
    """Every check that can be made before the run (raises UsageError)."""
    from .external import SubprocessReplay
    from .tolerances import REPLAY_CLASSES

    if args.jobs < 1:
        raise UsageError(f"--jobs={args.jobs} is invalid: expected an integer >= 1")
    if args.replay_numerics not in REPLAY_CLASSES:
        raise UsageError(f"--replay-numerics={args.replay_numerics!r} is invalid for a replay: expected one of "
                         f"{', '.join(REPLAY_CLASSES)} (the native classes describe a framework's own Adam, which "
                         "has no open loop)")
    if not args.replay_timeout > 0:
        raise UsageError(f"--replay-timeout={args.replay_timeout} is invalid: expected seconds > 0")
    found = discover(IMPL_MODULES)
    backends = _backends(args.backends, found)
    replays = []
    for spec in args.replay:
        try:
            port = SubprocessReplay(spec, numerics=args.replay_numerics, timeout=args.replay_timeout)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        why = port.check()
        if why is not None:
            raise UsageError(f"--replay={spec!r}: {why}")
        replays.append(port)
    if args.list:
        return backends, replays, None
    dtypes = ("float64", "float32") if args.dtype == "all" else (args.dtype,)
    runs_open = args.only in (None, "open")
    runs_closed = args.only in (None, "closed") and "float64" in dtypes
    if not runs_open and not runs_closed:
        raise UsageError(f"--only {args.only} with --dtype {args.dtype} runs nothing (the closed loop is float64)")
    selected = select(found, backends)
    runnable = [e for e in selected if not e.skip]
    if not selected and not replays:
        raise UsageError("nothing to check: --backends selects no implementation of this repository"
                         + (" and no --replay was given" if backends == [] else ""))
    if not runnable and not replays:
        raise UsageError("nothing to check: every selected implementation is skipped here ("
                         + "; ".join(f"{e.name}: {e.skip}" for e in selected) + ")")
    if not runs_open and replays and not runnable:
        raise UsageError("--only closed: a --replay port has no closed loop, so nothing would be checked")
    cases = _load_cases(args.vectors, dtypes) if runs_open else []
    if runs_open and not cases:
        raise UsageError(f"--vectors={args.vectors!r} holds no {args.dtype} vectors")
    if args.report:
        _check_report_dir(args.report)
    return backends, replays, cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        backends, replays, cases = _prepare(args)
    except UsageError as exc:
        return _fail(str(exc))
    if args.list:
        for e in select(discover(IMPL_MODULES), backends) + discover([], extra=replays):
            state = f"skipped: {e.skip}" if e.skip else (f"error: {e.error}" if e.error else "available")
            print(f"{e.name:40s} {e.framework:24s} {e.module:12s} {state}")
        return 0
    from .report import render_text, write_report
    from .runner import run_suite

    dtypes = ("float64", "float32") if args.dtype == "all" else (args.dtype,)
    result = run_suite(backends=backends, dtypes=dtypes, only=args.only, extra=replays, cases=cases,
                       progress=sys.stderr, jobs=args.jobs)
    print(render_text(result, per_case=not args.quiet), flush=True)
    defaults = _run_defaults(args, backends)
    if args.report:
        try:
            paths = write_report(result, args.report)
            if defaults is not None:
                from .defaults import render as render_defaults

                paths["defaults"] = Path(args.report) / "defaults.txt"
                paths["defaults"].write_text(render_defaults(defaults).lstrip() + "\n", encoding="utf-8")
        except OSError as exc:
            return _fail(f"the report could not be written to {args.report!r}: {exc}")
        print(f"report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if defaults is not None and not defaults.ok and result.exit_code == 0:
        return 1
    return result.exit_code


def _run_defaults(args: argparse.Namespace, backends: list[str] | None) -> Any:
    """The case "same architecture, default settings" (``defaults.py``): with the closed loop, float64.

    ``--backends`` keeps the frameworks it names (``torch``, ``optax``, ``jax``,
    ``keras``, ``keras[tensorflow]``, ...), as for the implementations.
    """
    if args.only == "open" or args.dtype == "float32":
        return None
    from .defaults import check_defaults, render

    def selected(framework: str) -> bool:
        if backends is None:
            return True
        names = tokens(framework) | ({"jax"} if framework == "optax" else set())
        return any(b.lower() in names for b in backends)

    result = check_defaults(selected, progress=sys.stderr)
    if not result.rows:
        return None
    print(render(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
