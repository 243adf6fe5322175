"""Build, cache and load the C kernels in ``native/`` with the system C compiler (no framework imported here).

A kernel is compiled on first use with ``$CC`` (default ``cc``) into a per-user
cache directory, the first of these that is safe:

1. ``$DUALOPT_NATIVE_CACHE`` (a relative value is taken relative to the current
   directory, made absolute once);
2. ``$XDG_CACHE_HOME/dualopt`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG
   specification says), else ``~/.cache/dualopt`` (skipped where there is no home
   directory: ``HOME`` unset and a uid without a passwd entry);
3. ``dualopt-<uid>`` in the system's temporary directory.

Safe means, for the directory and for every library file loaded from it: owned
by this user, not writable by group or others, and not reached through a
symbolic link. Every directory above it must be owned by this user or root and
be writable by nobody else (a sticky directory such as ``/tmp`` is allowed: no
one else can rename or remove this user's entries there); a symbolic link is
followed only where root made it above this user's part of the path (as
``/home -> /usr/home``), and its target must pass the same rules. Missing
directories are created with mode 0700. A candidate that fails is skipped, and
the reason is kept for :meth:`Library.status`. These are the rules OpenSSH
applies to ``authorized_keys``: whoever can write a directory on the way could
swap the library for their own, and ``dlopen`` runs its constructors as this user.

A library is named by a hash of its source, the flags, the compiler's resolved
path and ``--version`` output and the machine. It is compiled to a temporary
name in the cache directory, checked (a non-empty regular file of this user that
loads and has the expected ABI), then renamed into place atomically, so
concurrent processes may race harmlessly. A file under the final name that fails
the rules or does not load is never used: it is rebuilt and replaced.

The compiler (``$CC`` as found on ``PATH``, links resolved) must be owned by
this user or root and writable by nobody else, in directories that pass the
rules above. Each compiler run has a timeout (``$DUALOPT_NATIVE_BUILD_TIMEOUT`` seconds,
default 20). A compiler that exceeds it is killed with its children, and no
compiler runs again in that process. Any failure leaves the framework's own
kernels in use, with one warning per library and the reason in
:meth:`Library.status`. ``DUALOPT_NATIVE=0`` turns every kernel off, silently
(:func:`disabled` says so).

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
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["NATIVE_DIR", "TIMEOUT_ENV", "DEFAULT_TIMEOUT", "compile_flags", "disabled", "unavailable",
           "cache_dir", "load", "Library"]

NATIVE_DIR = Path(__file__).parent
#: The environment variable with the build timeout in seconds, and its default.
TIMEOUT_ENV, DEFAULT_TIMEOUT = "DUALOPT_NATIVE_BUILD_TIMEOUT", 20.0
# -ffp-contract=off and no -ffast-math keep every operation one IEEE rounding (bitwise the core);
# -fno-math-errno lets sqrt vectorise.
_FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")

# Once a compiler run timed out, the reason; no compiler runs again in this process (a second
# library, or the build without OpenMP, would stall as long again).
_hung: str | None = None
_identity: dict[str, tuple[str, str]] = {}  # compiler name -> (resolved path, --version output)
_run_lock = threading.Lock()


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


# ---------------------------------------------------------------------------------------- safe paths


def _foreign_writer(st: os.stat_result, where: str, uid: int) -> str | None:
    """Why a directory above the cache lets someone else replace what lies below it, else None."""
    if st.st_uid not in (0, uid):
        return f"{where} is owned by uid {st.st_uid}, not by this user or root"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _own_private(st: os.stat_result, where: str, uid: int) -> str | None:
    """Why a cache directory or library file is not this user's alone, else None."""
    if st.st_uid != uid:
        return f"{where} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _path_problem(path: str, *, leaf: bool, depth: int = 0) -> str | None:
    """Why the absolute ``path`` is not safe (see the module docstring), else None.

    ``leaf``: ``path`` is the cache directory itself (this user's, private);
    otherwise every component, the last included, is only a directory above it.
    """
    uid = os.getuid()
    parts = Path(path).parts
    current = ""
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        last = leaf and i == len(parts) - 1
        try:
            st = os.lstat(current)
        except OSError as exc:
            return f"{current}: {exc.strerror or exc}"
        if stat.S_ISLNK(st.st_mode):
            # Only a link root made above this user's part of the path is followed; this user's own
            # links (every link, for root) could point anywhere later.
            if last or uid == 0 or st.st_uid != 0 or depth > 0:
                return f"{current} is a symbolic link"
            why = _path_problem(os.path.realpath(current), leaf=False, depth=depth + 1)
            if why:
                return f"{current} is a symbolic link to an unsafe place ({why})"
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        why = _own_private(st, current, uid) if last else _foreign_writer(st, current, uid)
        if why:
            return why
    return None


def _safe_directory(path: str) -> str | None:
    """Create ``path`` (0700, with missing parents) where what exists above it is safe; why not, else None."""
    if not os.path.isabs(path):
        return f"{path} is not an absolute path"
    path = os.path.normpath(path)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if existing != path:
        why = _path_problem(existing, leaf=False)
        if why:
            return why
        for part in Path(os.path.relpath(path, existing)).parts:
            existing = os.path.join(existing, part)
            try:
                os.mkdir(existing, 0o700)
            except FileExistsError:
                pass  # a concurrent process made it: checked below like any existing directory
            except OSError as exc:
                return f"cannot create {existing}: {exc.strerror or exc}"
    return _path_problem(path, leaf=True)


def _candidates() -> list[tuple[str, str | None, str | None]]:
    """``(label, absolute path or None, why not usable or None)`` for every cache candidate, in order."""
    out: list[tuple[str, str | None, str | None]] = []
    env = os.environ.get("DUALOPT_NATIVE_CACHE")
    if env:
        # dlopen() searches the library path for a bare name: never hand it a relative one.
        out.append((f"$DUALOPT_NATIVE_CACHE={env}", os.path.abspath(env), None))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        out.append(("$XDG_CACHE_HOME/dualopt", os.path.join(xdg, "dualopt"), None))
    else:
        try:
            home = str(Path.home())
        except (RuntimeError, KeyError, OSError) as exc:  # HOME unset and a uid without a passwd entry
            out.append(("~/.cache/dualopt", None, f"no home directory ({exc})"))
        else:
            if xdg:
                out.append((f"$XDG_CACHE_HOME={xdg}", None, "ignored: not an absolute path (XDG specification)"))
            if os.path.isabs(home):
                out.append(("~/.cache/dualopt", os.path.join(home, ".cache", "dualopt"), None))
            else:
                out.append(("~/.cache/dualopt", None, f"the home directory {home!r} is not an absolute path"))
    tmp = os.path.abspath(tempfile.gettempdir())
    out.append(("temporary directory", os.path.join(tmp, f"dualopt-{os.getuid()}"), None))
    return out


def cache_dir(skipped: list[str] | None = None) -> Path:
    """The first safe cache directory (see the module docstring); raises OSError where there is none.

    ``skipped``, where given, receives one line per candidate passed over, with the reason.
    """
    reasons: list[str] = []
    for label, path, why in _candidates():
        if path is not None and why is None:
            why = _safe_directory(path)
            if why is None:
                if skipped is not None:
                    skipped += reasons
                return Path(path)
        reasons.append(f"{label}: {why}")
    raise OSError("no safe cache directory (" + "; ".join(reasons) + ")")


# ------------------------------------------------------------------------------------------ building


def build_timeout() -> float:
    """Seconds one compiler run may take (``$DUALOPT_NATIVE_BUILD_TIMEOUT``, default 20)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise OSError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def _run(cmd: list[str]) -> tuple[int, str]:
    """``(returncode, stdout + stderr)`` of a compiler run, killed with its children after :func:`build_timeout`."""
    global _hung
    timeout = build_timeout()
    with _run_lock:
        if _hung:
            raise OSError(_hung)
        # A session of its own, so that a timeout kills the whole process group: a wrapper script's
        # children would otherwise hold the pipes open and communicate() would wait for them.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            _hung = f"compiler {cmd[0]!r} hung for {timeout:g} s and was killed; no C kernel is built in this process"
            raise OSError(_hung) from None
    return proc.returncode, out


def _compiler(name: str) -> tuple[str, str, str]:
    """``(command, resolved path, --version output)`` of the compiler ``name``; raises OSError."""
    found = shutil.which(name)
    if found is None:
        raise OSError(f"no C compiler ({name!r} not found)")
    # The compiler writes the code that is loaded: it obeys the rules of the directories above the cache.
    real = os.path.realpath(found)
    try:
        why = _path_problem(os.path.dirname(real), leaf=False) or _foreign_writer(os.stat(real), real, os.getuid())
    except OSError as exc:
        why = f"{real}: {exc.strerror or exc}"
    if why:
        raise OSError(f"the compiler {name!r} is not run: {why}")
    if name not in _identity:
        # A compiler without --version still has an identity: its answer, whatever it is.
        rc, out = _run([found, "--version"])
        _identity[name] = (os.path.realpath(found), f"exit status {rc}\n{out}")
    return (found, *_identity[name])


def _library_problem(path: str) -> str | None:
    """Why the library file ``path`` must not be loaded, else None (see the module docstring)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_size == 0:
        return f"{path} is empty"
    return _own_private(st, path, os.getuid())


def _open(path: str, check: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """``dlopen`` the checked file ``path`` (absolute) and run ``check`` on it; raises OSError."""
    why = _library_problem(path)
    if why:
        raise OSError(why)
    try:
        lib = ctypes.CDLL(path)
        check(lib)
    except AttributeError as exc:  # a missing symbol
        raise OSError(f"{path}: {exc}") from None
    return lib


def _key(source: Path, cmd: Sequence[str], identity: Sequence[str]) -> str:
    parts = [source.read_bytes(), "\0".join(cmd).encode(), *(s.encode() for s in identity),
             platform.machine().encode(), sys.platform.encode()]
    return hashlib.sha256(b"\0\0".join(parts)).hexdigest()[:16]


def load(source: Path, flags: Sequence[str], check: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL, Path, str]:
    """The library built from ``source`` with ``flags``, loaded: ``(lib, path, note)``; raises OSError.

    ``check(lib)`` raises OSError or AttributeError where a loaded library is not
    the expected one (e.g. its ABI function is missing or answers another
    number). A cached file under the final name is used only if it passes the
    rules and ``check``; otherwise it is rebuilt.
    ``note`` says which cache candidates were skipped and which file was replaced, and why.
    """
    name = os.environ.get("CC", "cc")
    command, resolved, version = _compiler(name)
    notes: list[str] = []
    directory = cache_dir(notes)
    notes = [f"skipped {n}" for n in notes]
    target = directory / f"{source.stem}-{_key(source, flags, [resolved, version])}.so"
    if os.path.lexists(target):
        try:
            return _open(str(target), check), target, "; ".join(notes)
        except OSError as exc:
            notes.append(f"rebuilt: {exc}")  # the rename below replaces it (a link itself, never its target)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".tmp.so", dir=directory)
    os.close(fd)
    try:
        rc, out = _run([command, *flags, str(source), "-o", tmp, "-lm"])
        if rc != 0:
            raise OSError(f"{name} failed (exit status {rc}): {out.strip()[:500]}")
        os.chmod(tmp, 0o755)  # the linker's umask may have left it group-writable
        try:
            lib = _open(tmp, check)
        except OSError as exc:
            raise OSError(f"{name} exited 0 but gave no usable library ({exc})") from None
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return lib, target, "; ".join(notes)


class Library:
    """One C library, built and loaded on first use by ``load() -> (CDLL, path[, note])``; thread-safe.

    ``state`` holds ``lib`` (the CDLL, or None where it cannot be had) and
    ``reason`` (why, or where it was loaded from). A failure warns once.
    """

    def __init__(self, load: Callable[[], tuple[Any, ...]], name: str = "C kernel") -> None:
        self._load = load
        self._name = name
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
            lib, path, *note = self._load()
        except Exception as exc:  # noqa: BLE001 - any failure means the framework's kernels, never a crash
            reason = " ".join(f"not available: {exc}".split())
            self.state.update(lib=None, reason=reason)
            warnings.warn(f"dualopt: the {self._name} is not used ({reason}); the framework's own kernels run "
                          "instead (slower, same results to the fast path's tolerance). DUALOPT_NATIVE=0 turns "
                          "the C kernels off without this warning.", RuntimeWarning, stacklevel=4)
            return
        extra = f" ({note[0]})" if note and note[0] else ""
        self.state.update(lib=lib, reason=f"loaded from {path}{extra}")
