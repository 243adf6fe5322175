"""Build and cache the C kernels in ``native/`` with the system C compiler (no framework imported here).

Both C front ends (``native/dualopt_cpu.c`` for torch, ``native/dualopt_xla.c``
for JAX) are compiled on first use with ``$CC`` (default ``cc``) into a cache
directory: ``$DUALOPT_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/dualopt`` or
``~/.cache/dualopt``, else a private directory (0700, owned by this user) under
the system's temporary directory. A library is named by a hash of its sources,
the headers they include, the compiler, the flags and the machine, so a change of
any of them builds anew; it is written atomically, so concurrent processes may
race to build it harmlessly. Nothing is ever loaded from a directory that another
user could write into.

``DUALOPT_NATIVE=0`` turns every kernel off (:func:`disabled` says so); the
callers then keep their framework's own kernels.

Examples
--------
>>> flags = compile_flags(openmp=False)
>>> "-ffp-contract=off" in flags and "-fopenmp" not in flags
True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["NATIVE_DIR", "compile_flags", "disabled", "unavailable", "cache_dir", "build", "Library"]

NATIVE_DIR = Path(__file__).with_name("native")
# -ffp-contract=off and no -ffast-math keep every operation one IEEE rounding (bitwise the core);
# -fno-math-errno lets sqrt vectorise.
_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")


def compile_flags(*, openmp: bool) -> tuple[str, ...]:
    """The compiler flags of every kernel, with ``-fopenmp`` where asked for."""
    return _FLAGS + (("-fopenmp",) if openmp else ())


def disabled() -> str | None:
    """Why the C kernels must not be built or loaded (``DUALOPT_NATIVE=0``, Windows), else None."""
    if os.environ.get("DUALOPT_NATIVE", "1") == "0":
        return "disabled by DUALOPT_NATIVE=0"
    if sys.platform == "win32":
        return "not built on Windows"
    return None


def unavailable() -> str | None:
    """Why no kernel can be built here, judged without building (:func:`disabled`, or no compiler), else None."""
    off = disabled()
    if off:
        return off
    compiler = os.environ.get("CC", "cc")
    return None if shutil.which(compiler) else f"no C compiler ({compiler!r} not found)"


class Library:
    """One C library, built and loaded on first use by ``load() -> (CDLL, path)``; thread-safe.

    ``state`` holds ``lib`` (the CDLL, or None where it cannot be had) and
    ``reason`` (why, or where it was loaded from).
    """

    def __init__(self, load: Callable[[], tuple[ctypes.CDLL, Path]]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {}

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None (see :meth:`status`); built on the first call."""
        if "lib" not in self.state:
            with self._lock:
                if "lib" not in self.state:
                    self._first_load()
        return self.state["lib"]

    def status(self) -> dict[str, Any]:
        """``{"enabled": bool, "reason": str}``: whether the kernels are loaded, and why (not)."""
        lib = self.get()
        return {"enabled": lib is not None, "reason": self.state["reason"]}

    def _first_load(self) -> None:
        off = disabled()
        if off:
            self.state.update(lib=None, reason=off)
            return
        try:
            lib, path = self._load()
        except (OSError, AttributeError, subprocess.SubprocessError) as exc:
            self.state.update(lib=None, reason=f"not available: {exc}")
            return
        self.state.update(lib=lib, reason=f"loaded from {path}")


def cache_dir() -> Path:
    """Where built libraries live (see the module docstring); raises OSError where no safe place exists."""
    env = os.environ.get("DUALOPT_NATIVE_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualopt"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"dualopt-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    # A shared temporary directory: load nothing from a directory another user could write into.
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{private} is not a private directory of this user")
    return private


def build(source: Path, flags: Sequence[str], *, includes: Sequence[Path] = (),
          compiler: str | None = None) -> Path:
    """The shared library built from ``source`` (cached); raises OSError when the compiler fails.

    ``includes`` are include directories searched besides ``native/``; every
    header of ``native/`` and the files named in ``includes`` that the source may
    read enter the cache key through their contents.
    """
    compiler = compiler or os.environ.get("CC", "cc")
    include_flags = [f"-I{d}" for d in includes]
    parts = [source.read_bytes(), " ".join([compiler, *flags, *include_flags]).encode(), platform.machine().encode(),
             sys.platform.encode()]
    parts += [h.read_bytes() for h in sorted(NATIVE_DIR.glob("*.h"))]
    parts += [h.read_bytes() for d in includes for h in sorted(Path(d).rglob("*.h"))]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, *include_flags, str(source), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{compiler} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
