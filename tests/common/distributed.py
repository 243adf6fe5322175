"""Start the worker processes of a distributed test and collect what each rank wrote.

Every engine here needs a fresh process: torch's process group is one per
process, and JAX reads ``XLA_FLAGS`` (the number of host devices) only at its
first import. A worker is a module (run with ``python -m``) that takes the path of a pickled request
and the path to pickle its answer to; torch workers additionally find their
rank in a torchrun-like environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
and rendezvous through a file store (``DUALOPT_DIST_STORE``), which needs no
free TCP port, so two pytest workers never collide.

Workers are started with one intra-op thread each (``OMP_NUM_THREADS=1``):
this machine has two cores, and two ranks plus a pytest worker would otherwise
oversubscribe them many times over.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

ROOT = Path(__file__).resolve().parents[2]


def report(engine: str, dev: Any) -> None:
    """Print one engine's measured deviation (``pytest -s`` shows it; the closing figures come from here)."""
    print(f"\n[distributed] {engine}: max abs {dev.max_abs:.1e}, max scaled {dev.max_scaled:.1e}, "
          f"max ulp {dev.max_ulp:.0f}, {dev.steps} comparisons")


def once_per_session(tmp_path_factory: Any, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per pytest session, shared by all xdist workers, one distributed run at a time.

    A session-scoped fixture alone runs once per *worker*; the tests of one
    request are meant to share an ``xdist_group`` (one worker), but
    ``--dist loadgroup`` silently stops grouping with pytest 9.2 and
    pytest-xdist 3.8 (pytest-dev/pytest-xdist#1386: the group suffix is
    written to ``item._nodeid``, which pytest 9.2 no longer reads), and the
    requests would then run on both workers at once, twice, on two cores.
    So the answer is pickled under the session's shared temporary directory
    (the pattern of the pytest-xdist docs, "Making session-scoped fixtures
    execute only once") and one file lock serialises every distributed run.
    An answer that raised is not stored: a later caller recomputes it and
    shows its own error.
    """
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return compute()
    shared = tmp_path_factory.getbasetemp().parent  # the same directory for every worker of this session
    with FileLock(str(shared / "dualopt-distributed.lock")):
        path = shared / f"dualopt-distributed-{key}.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        answer = compute()
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as fh:
            pickle.dump(answer, fh)
        os.replace(partial, path)
        return answer


def run_workers(module: str, request: Any, *, world: int = 1, env: Mapping[str, str] | None = None,
                timeout: float = 600.0) -> list[Any]:
    """Run ``world`` copies of ``python -m <module>`` (from the repository root) on ``request``; the answers, by rank.

    A rank that fails (non-zero exit, or no answer) makes this raise with the
    tail of every rank's stderr, so a failing test shows the worker's traceback.
    """
    with tempfile.TemporaryDirectory(prefix="dualopt-dist-") as tmp:
        src = os.path.join(tmp, "request.pkl")
        with open(src, "wb") as fh:
            pickle.dump(request, fh)
        base = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
                    DUALOPT_DIST_STORE=os.path.join(tmp, "store"), WORLD_SIZE=str(world))
        base.update(env or {})
        procs = []
        logs = []
        for rank in range(world):
            dst = os.path.join(tmp, f"answer{rank}.pkl")
            log = open(os.path.join(tmp, f"stderr{rank}.txt"), "w+")
            logs.append(log)
            rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append((subprocess.Popen([sys.executable, "-m", module, src, dst], env=rank_env, cwd=ROOT,
                                           stdout=subprocess.DEVNULL, stderr=log), dst))
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for proc, _ in procs:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for proc, _ in procs:
                proc.kill()
            codes = [proc.wait() for proc, _ in procs]
            codes = [f"killed after {timeout:.0f} s" for _ in codes]
        answers = []
        problems = []
        for rank, ((proc, dst), log, code) in enumerate(zip(procs, logs, codes)):
            log.seek(0)
            err = log.read()
            log.close()
            if code != 0 or not os.path.exists(dst):
                problems.append(f"--- rank {rank} (exit {code}):\n{err[-6000:]}")
                continue
            with open(dst, "rb") as fh:
                answers.append(pickle.load(fh))
        if problems:
            raise RuntimeError(f"{module} with {world} process(es) failed:\n" + "\n".join(problems))
        return answers
