"""The subprocess in which a ``--replay MODULE:FUNCTION`` port runs (see :class:`external.SubprocessReplay`).

``python -m dualopt.conformance._replay_worker JOB OUTDIR``: JOB is a pickle
the parent wrote into its private temporary directory (the port's spec, the
directory to import from, the cases); for each case the worker writes
``OUTDIR/<i>.json`` (tensor names per step, or the error) and ``OUTDIR/<i>.npz``
(the arrays), and reports ``start i`` / ``done i`` on its own copy of stdout.
The port's prints go to stderr, so they cannot forge those lines by accident.
The parent never unpickles anything the port wrote: it reads JSON and ``.npz``
without pickle.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import stat
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np


def safe_import_dir(directory: str) -> str | None:
    """Why ``directory`` must not be put on ``sys.path`` (None when it may): another user could plant a module."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    if st.st_uid not in (os.getuid(), 0):
        return f"{directory} is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{directory} is writable by group or others"
    return None


def load_function(spec: str, directory: str | None) -> Callable[..., Any]:
    """Import ``MODULE:FUNCTION`` as ``python -m`` would: ``directory`` (the caller's cwd) first on the path."""
    module, _, func = spec.partition(":")
    if directory is not None and safe_import_dir(directory) is None and directory not in sys.path:
        sys.path.insert(0, directory)
    fn = getattr(importlib.import_module(module), func)
    if not callable(fn):
        raise TypeError(f"{spec} is a {type(fn).__name__}, not a callable replay(case) -> trajectory")
    return fn


def _error(exc: BaseException) -> str:
    # The innermost frame outside the import machinery: the port's own line.
    tb = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}){where}"
    return f"raised {type(exc).__name__}: {exc}{where}"


def _save(traj: Any, out: Path, i: int) -> None:
    """Write a trajectory as JSON names plus an .npz of plain numeric arrays, or say why it is not one."""
    if not isinstance(traj, (list, tuple)):
        raise TypeError(f"returned a {type(traj).__name__}, expected a list with one dict per step")
    names: list[list[str]] = []
    arrays: dict[str, np.ndarray] = {}
    for t, step in enumerate(traj):
        if not isinstance(step, dict):
            raise TypeError(f"step {t + 1} is a {type(step).__name__}, expected a dict tensor name -> array")
        names.append([str(k) for k in step])
        for j, v in enumerate(step.values()):
            a = np.asarray(v)
            if a.dtype.kind not in "fiub":
                raise TypeError(f"step {t + 1}, tensor {list(step)[j]!r}: dtype {a.dtype} is not numeric")
            arrays[f"s{t}_{j}"] = a
    np.savez(out / f"{i}.npz", **arrays)
    (out / f"{i}.json").write_text(json.dumps({"names": names}))


def main(argv: list[str]) -> int:
    job_file, out_dir = argv
    # Keep the protocol on a private descriptor; the port's own prints (fd 1) go to stderr.
    proto: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    job = pickle.loads(Path(job_file).read_bytes())
    out = Path(out_dir)
    try:
        fn = load_function(job["spec"], job["directory"])
    except BaseException as exc:  # noqa: BLE001 - SystemExit at import included: the parent reports it
        proto.write("import " + json.dumps(_error(exc)) + "\n")
        return 0
    proto.write("ready\n")
    if job.get("check_only"):
        return 0
    for i, case in job["cases"]:
        proto.write(f"start {i}\n")
        try:
            _save(fn(case), out, i)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are a failed case too
            (out / f"{i}.json").write_text(json.dumps({"error": _error(exc)}))
        proto.write(f"done {i}\n")
    proto.write("end\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
