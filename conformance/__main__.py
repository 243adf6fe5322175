"""``python -m dualopt.conformance`` (console script ``dualopt-conformance``).

Prints one table per case and the aggregate on stdout, progress on stderr,
writes ``conformance.{md,json,png}`` into ``--report`` and exits 1 when any
implementation falls outside its tolerance (2 on bad usage).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .discovery import IMPL_MODULES, discover

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dualopt.conformance",
        description="Replay the spec's test vectors through every installed DualOpt implementation (open loop), "
                    "train the same MLP in every framework (closed loop), and compare with the reference core.")
    p.add_argument("--backends", metavar="NAMES", default=None,
                   help="comma-separated framework names to keep, e.g. 'torch,keras' or 'core' or 'numpy' or "
                        "'keras[tensorflow]' (a name matches every implementation that involves it: 'torch' keeps "
                        "torch, core[torch] and keras[torch]); default: all")
    p.add_argument("--dtype", choices=("float64", "float32", "all"), default="all",
                   help="vector dtype(s) to replay; the closed loop is float64 and runs unless --dtype float32")
    p.add_argument("--only", choices=("open", "closed"), default=None, help="run one loop only")
    p.add_argument("--report", metavar="DIR", default="reports/conformance",
                   help="directory for conformance.md/.json/.png (default: reports/conformance); '' to skip")
    p.add_argument("--replay", metavar="MODULE:FUNCTION", action="append", default=[],
                   help="also test an external implementation: a function replay(case) -> trajectory "
                        "(see conformance/README.md); repeatable")
    p.add_argument("--replay-numerics", default="exact", metavar="CLASS",
                   help="tolerance class of the --replay implementations (default: exact; see spec/TOLERANCES.md)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="implementations run at the same time (default: min(2, CPUs)); 1 runs them one by one")
    p.add_argument("--quiet", action="store_true", help="print only the aggregate table and the summary line")
    p.add_argument("--list", action="store_true", help="list the implementations found and exit")
    return p


def _load_replay(spec: str, numerics: str, parser: argparse.ArgumentParser):
    from .external import ReplayImplementation

    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        parser.error(f"--replay={spec!r} is invalid: expected MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        parser.error(f"--replay={spec!r} is invalid: {exc}")
    return ReplayImplementation(fn, name=f"{func} ({module})", numerics=numerics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .discovery import select
    from .tolerances import CLASSES

    if args.replay_numerics not in CLASSES:
        parser.error(f"--replay-numerics={args.replay_numerics!r} is invalid: expected one of {tuple(CLASSES)}")
    backends = None if args.backends is None else [b for b in args.backends.split(",") if b.strip()]
    extra = [_load_replay(s, args.replay_numerics, parser) for s in args.replay]
    if args.list:
        for e in select(discover(IMPL_MODULES), backends) + discover([], extra=extra):
            state = f"skipped: {e.skip}" if e.skip else (f"error: {e.error}" if e.error else "available")
            print(f"{e.name:40s} {e.framework:24s} {e.module:12s} {state}")
        return 0
    from .report import render_text, write_report
    from .runner import run_suite

    dtypes = ("float64", "float32") if args.dtype == "all" else (args.dtype,)
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is invalid: expected an integer >= 1")
    result = run_suite(backends=backends, dtypes=dtypes, only=args.only, extra=extra, progress=sys.stderr,
                       jobs=args.jobs)
    print(render_text(result, per_case=not args.quiet), flush=True)
    if args.report:
        paths = write_report(result, args.report)
        print(f"report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
