"""Issue 16: the C kernel is loaded only from safe places, never stalls, and never sees a wrong operand.

Cache directories and library files that another user could write, or that are
reached through a symbolic link, are skipped (a library planted there, whose
constructor would write a marker file, is never loaded); a missing home
directory, a compiler that writes nothing or hangs, and a relative cache path
fall back to the next candidate or to torch's kernels with one warning. A
parameter converted to another dtype after the optimizer was created raises
the same clear error on every update path, and the finiteness check never
writes into a gradient without memory of its own (stride 0).

The loader cases run in fresh processes: the library is loaded once per process,
and a regression may crash (a heap overflow) or stall.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import dualopt.native._build as build  # noqa: E402
import dualopt.torch._kernels as kernels  # noqa: E402
from dualopt.conformance.tolerances import fast_path_tolerance  # noqa: E402
import dualopt.torch._native as native  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

CC = os.environ.get("CC", "cc")
needs_cc = pytest.mark.skipif(shutil.which(CC) is None or os.environ.get("DUALOPT_NATIVE") == "0",
                              reason="no C compiler here")
TIMEOUT_ENV = "DUALOPT_NATIVE_BUILD_TIMEOUT"
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
BIG = kernels.DEFAULT_POLICY.native_min_numel + 7  # large enough for the C kernel

# Two finetune steps of one large tensor, then what the process saw, as one JSON line.
STEP = textwrap.dedent("""
    import json, time, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, dualopt.torch._native as n
        from dualopt.torch import DualOpt
        p = torch.nn.Parameter(torch.ones({big}))
        o = DualOpt([p], lr=0.1, paradigm="finetune")
        seconds = []
        for _ in range(2):
            p.grad = torch.ones({big})
            t0 = time.monotonic()
            o.step()
            seconds.append(time.monotonic() - t0)
    s = n.native_status()
    print(json.dumps(dict(enabled=s["enabled"], reason=s["reason"], p=float(p[0]), seconds=seconds,
                          warnings=[str(w.message) for w in caught if "dualopt" in str(w.message)])))
""").format(big=BIG)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any cache setting; a private TMPDIR and HOME under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DUALOPT_NATIVE_CACHE", "XDG_CACHE_HOME", "DUALOPT_NATIVE", TIMEOUT_ENV)}
    for name in ("tmp", "home"):
        (tmp_path / name).mkdir(mode=0o700, exist_ok=True)
    env.update(TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path / "home"))
    env.update(extra)
    return env


def _run(env: dict[str, str], code: str = STEP, cwd: Path | None = None, timeout: float = 90) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)
    return path


def _library_name(tmp_path: Path) -> str:
    """The file name this process's compiler gives the kernel (learnt from a build in a scratch cache)."""
    cache = _private_dir(tmp_path / "learn")
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(cache)))
    assert got["enabled"], got
    (name,) = [p.name for p in cache.iterdir() if p.suffix == ".so"]
    return name


def _plant(path: Path, marker: Path) -> None:
    """A library with the kernel's ABI whose constructor writes ``marker``: what an attacker would plant."""
    src = path.with_suffix(".c")
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void plant(void) {{
          FILE *f = fopen("{marker}", "w");
          if (f) fclose(f);
        }}
        int dualopt_abi(void) {{ return 1; }}
        void dualopt_adam_pull(void) {{}}
    """))
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    src.unlink()


def _loaded_from(got: dict) -> Path:
    assert got["enabled"], got
    return Path(got["reason"].split("loaded from ", 1)[1].split(" (")[0])


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------------- cache places


@needs_cc
def test_a_cache_dir_writable_by_others_is_skipped_and_its_planted_library_never_loaded(tmp_path):
    name = _library_name(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "marker"
    _plant(shared / name, marker)
    xdg = tmp_path / "xdg"
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(shared), XDG_CACHE_HOME=str(xdg)))
    assert not marker.exists()
    assert _loaded_from(got).parent == xdg / "dualopt"
    assert f"{shared} is writable by group or others" in got["reason"]
    assert stat.S_IMODE((xdg / "dualopt").stat().st_mode) == 0o700  # created private
    assert stat.S_IMODE(xdg.stat().st_mode) == 0o700
    assert sorted(p.name for p in shared.iterdir()) == [name]  # nothing built there either
    assert got["p"] < 1.0 and got["warnings"] == []


@needs_cc
@needs_root
def test_a_cache_dir_owned_by_another_user_is_skipped(tmp_path):
    theirs = _private_dir(tmp_path / "theirs")
    os.chown(theirs, 65534, 65534)
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(theirs), XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert _loaded_from(got).parent == tmp_path / "xdg" / "dualopt"
    assert f"{theirs} is owned by uid 65534" in got["reason"]
    assert not any(theirs.iterdir())


@needs_cc
@needs_root
def test_a_library_owned_by_another_user_is_never_loaded_but_replaced(tmp_path):
    name = _library_name(tmp_path)
    cache = _private_dir(tmp_path / "cache")
    marker = tmp_path / "marker"
    _plant(cache / name, marker)
    os.chown(cache / name, 65534, 65534)
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(cache)))
    assert not marker.exists()
    assert _loaded_from(got) == cache / name and "is owned by uid 65534" in got["reason"]
    assert (cache / name).stat().st_uid == os.getuid()


@needs_cc
@pytest.mark.parametrize("where", ["leaf", "parent"])
def test_a_cache_dir_reached_through_a_symlink_is_skipped(tmp_path, where):
    real = _private_dir(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    cache = link if where == "leaf" else link / "cache"
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(cache), XDG_CACHE_HOME=str(tmp_path / "xdg")))
    assert _loaded_from(got).parent == tmp_path / "xdg" / "dualopt"
    assert f"{link} is a symbolic link" in got["reason"]
    assert not any(real.iterdir())


@needs_cc
def test_a_symlinked_library_file_is_never_loaded_but_replaced(tmp_path):
    name = _library_name(tmp_path)
    cache = _private_dir(tmp_path / "cache")
    elsewhere = _private_dir(tmp_path / "elsewhere")
    marker = tmp_path / "marker"
    _plant(elsewhere / "planted.so", marker)
    (cache / name).symlink_to(elsewhere / "planted.so")
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(cache)))
    assert not marker.exists()
    assert _loaded_from(got) == cache / name and "is a symbolic link" in got["reason"]
    assert not (cache / name).is_symlink() and (cache / name).stat().st_size > 0
    assert (elsewhere / "planted.so").exists()  # the link was replaced, its target left alone


@needs_cc
@pytest.mark.parametrize("content", [b"", b"not a library"])
def test_an_empty_or_invalid_cached_library_is_rebuilt(tmp_path, content):
    name = _library_name(tmp_path)
    cache = tmp_path / "learn"
    (cache / name).write_bytes(content)
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(cache)))
    assert _loaded_from(got) == cache / name and "rebuilt" in got["reason"]
    assert (cache / name).stat().st_size > 1000 and got["warnings"] == []


@needs_cc
def test_a_relative_cache_dir_is_made_absolute(tmp_path):
    work = _private_dir(tmp_path / "work")
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE="."), cwd=work)
    assert _loaded_from(got).parent == work  # dlopen() gets an absolute path, never a bare name
    assert got["warnings"] == []


@needs_cc
def test_without_a_home_directory_the_private_temporary_directory_is_used(tmp_path):
    code = ("import pathlib\n"
            "def no_home(cls=None): raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = classmethod(no_home)\n" + STEP)
    env = _env(tmp_path)
    del env["HOME"]
    got = _run(env, code)
    assert _loaded_from(got).parent == tmp_path / "tmp" / f"dualopt-{os.getuid()}"
    assert "no home directory" in got["reason"] and got["p"] < 1.0


def test_cache_dir_falls_through_when_path_home_raises(tmp_path, monkeypatch):
    """The same in this process, where no compiler is needed: only the directory choice."""
    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")

    for var in ("HOME", "XDG_CACHE_HOME", "DUALOPT_NATIVE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert build.cache_dir() == tmp_path / f"dualopt-{os.getuid()}"
    skipped: list[str] = []
    build.cache_dir(skipped)
    assert len(skipped) == 1 and "no home directory" in skipped[0]
    assert stat.S_IMODE((tmp_path / f"dualopt-{os.getuid()}").stat().st_mode) == 0o700


def test_no_safe_cache_dir_names_every_reason(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DUALOPT_NATIVE_CACHE", str(blocker / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "b"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with pytest.raises(OSError) as err:
        build.cache_dir()
    message = str(err.value)
    assert message.count(f"{blocker} is not a directory") == 2
    assert f"{shared} is writable by group or others" in message


# -------------------------------------------------------------------------------- broken compilers


@needs_cc
def test_a_compiler_that_writes_nothing_is_not_cached(tmp_path):
    cc = _script(tmp_path / "quiet-cc", "exit 0")
    cache = _private_dir(tmp_path / "cache")
    for _ in range(2):  # the second process must not find anything of the first's under a final name
        got = _run(_env(tmp_path, CC=str(cc), DUALOPT_NATIVE_CACHE=str(cache)))
        assert not got["enabled"] and "gave no usable library" in got["reason"] and "empty" in got["reason"]
        assert len(got["warnings"]) == 1 and got["p"] < 1.0
        assert list(cache.iterdir()) == []


def test_a_hanging_compiler_is_killed_after_the_timeout_with_one_warning(tmp_path):
    cc = _script(tmp_path / "slow-cc", "sleep 60")
    t0 = time.monotonic()
    got = _run(_env(tmp_path, CC=str(cc), DUALOPT_NATIVE_CACHE=str(_private_dir(tmp_path / "cache")),
                    **{TIMEOUT_ENV: "1"}), timeout=50)
    assert not got["enabled"] and "hung for 1 s" in got["reason"]
    assert got["warnings"] == [w for w in got["warnings"] if "hung for 1 s" in w] and len(got["warnings"]) == 1
    assert got["seconds"][0] < 10 and got["seconds"][1] < 1  # killed once; no second attempt, no second stall
    assert got["p"] < 1.0
    assert time.monotonic() - t0 < 45


def test_an_invalid_timeout_is_a_reason_not_a_crash(tmp_path):
    got = _run(_env(tmp_path, DUALOPT_NATIVE_CACHE=str(_private_dir(tmp_path / "cache")),
                    **{TIMEOUT_ENV: "soon"}))
    assert not got["enabled"] and "DUALOPT_NATIVE_BUILD_TIMEOUT='soon'" in got["reason"]
    assert len(got["warnings"]) == 1 and got["p"] < 1.0


# ------------------------------------------------------------------------------ operands of a step


def _converted(to: str, path: str):
    """A finetune optimizer made, stepped, then its model converted ``to`` float64/float32 (in place)."""
    n = BIG if path == "kernel" else 40
    model = torch.nn.Linear(1, n, bias=False)  # weight: n x 1
    if to == "float":
        model.double()
    opt = DualOpt(model.named_parameters(), lr=1e-2, paradigm="finetune", foreach=path != "reference")
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
    getattr(model, to)()
    model.weight.grad = torch.ones_like(model.weight)
    return model, opt


def _check_refused(model, opt, to: str) -> None:
    before = model.weight.detach().clone()
    new, old = ("torch.float64", "torch.float32") if to == "double" else ("torch.float32", "torch.float64")
    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert f"parameter 'weight' is {new} on cpu" in message, message
    assert f"'exp_avg' is {old}" in message and f"needs {new}" in message
    assert "opt.load_state_dict(opt.state_dict())" in message and "Nothing was updated" in message
    assert torch.equal(model.weight.detach(), before) and opt.state[model.weight]["step"] == 1
    # The advice works: the state follows the parameters' new dtype, and the step runs.
    opt.load_state_dict(opt.state_dict())
    opt.step()
    st = opt.state[model.weight]
    assert {st[k].dtype for k in ("exp_avg", "exp_avg_sq", "anchor")} == {model.weight.dtype}
    assert st["step"] == 2 and not torch.equal(model.weight.detach(), before)
    weight = model.weight.detach()
    assert bool(torch.isfinite(weight).all()) and float(weight.abs().max()) < 10


@pytest.mark.parametrize("to", ["double", "float"])
@pytest.mark.parametrize("path", ["fused", "reference", "fused-without-kernel"])
def test_a_dtype_change_after_construction_is_refused_on_the_torch_paths(to, path, monkeypatch):
    if path == "fused-without-kernel":
        monkeypatch.setitem(native._state, "lib", None)
    model, opt = _converted(to, "kernel" if path == "fused-without-kernel" else path)
    _check_refused(model, opt, to)


# In a fresh process: before the fix this wrote float64 values into float32 buffers (a crash) or read
# float32 memory as float64 (weights of about 1e18).
_KERNEL_CASE = textwrap.dedent("""
    import pytest, torch
    from tests.torch import test_torch_native_safety as t
    import dualopt.torch._native as n
    for to in ("double", "float"):
        model, opt = t._converted(to, "kernel")
        if n.native_status()["enabled"]:
            (plan,) = opt._plans.values()
            assert plan.buckets[0].native == [0], "the kernel took the first step"
        t._check_refused(model, opt, to)
    print("{}")
""")


@pytest.mark.parametrize("native_env", ["1", "0"])
def test_a_dtype_change_after_construction_is_refused_on_the_kernel_path(tmp_path, native_env):
    code = _KERNEL_CASE
    env = _env(tmp_path, DUALOPT_NATIVE=native_env, DUALOPT_NATIVE_CACHE=str(_private_dir(tmp_path / "cache")))
    assert _run(env, code, cwd=Path(__file__).resolve().parents[2]) == {}  # the repository root: imports tests.torch


def test_the_kernel_refuses_operands_of_another_dtype_or_size():
    def operands(n=BIG, dtype=torch.float32):
        return [[torch.zeros(n, dtype=dtype)] for _ in range(5)]

    p, g, m, v, a = operands()
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, inv_sqrt_bc2=1.0, maximize=False)
    bad = {"anchor float64": (p, g, m, v, [torch.zeros(BIG, dtype=torch.float64)]),
           "exp_avg short": (p, g, [torch.zeros(BIG - 1)], v, a),
           "grad strided": (p, [torch.zeros(2 * BIG)[::2]], m, v, a),
           "exp_avg_sq on meta": (p, g, m, [torch.zeros(BIG, device="meta")], a),
           "param float16": operands(dtype=torch.float16)}
    for what, args in bad.items():
        with pytest.raises(ValueError, match="dualopt C kernel"):
            native.adam_pull(*args, [0.5], **kw)
        assert native.operand_problem(*args) is not None, what
    assert native.operand_problem(p, g, m, v, a) is None


# ------------------------------------------------------------------------------- stride-0 gradients


@pytest.mark.parametrize("n", [5, kernels.DEFAULT_POLICY.fold_min_numel + 3])
@pytest.mark.parametrize("paradigm", ["finetune", "scratch"])
def test_an_expanded_stride_0_gradient_is_read_not_written(n, paradigm):
    init = torch.linspace(-1, 1, n, dtype=torch.float64)
    results = {}
    for foreach in (None, False):
        p = torch.nn.Parameter(init.clone())
        opt = DualOpt([p], lr=1e-2, paradigm=paradigm, rollback_max=5.0, foreach=foreach)
        for step in range(3):
            base = torch.tensor([0.5 + step], dtype=torch.float64)
            p.grad = base.expand(n)  # torch.optim.Adam accepts this gradient
            storage = bytes(p.grad.untyped_storage())
            opt.step()
            assert p.grad.stride() == (0,) and bytes(p.grad.untyped_storage()) == storage
            assert torch.equal(base, torch.tensor([0.5 + step], dtype=torch.float64))
        results[foreach] = p.detach()
    assert opt.skipped == 0 and not torch.equal(results[False], init)
    tol = fast_path_tolerance(torch.float64, 3)
    torch.testing.assert_close(results[None], results[False], rtol=tol, atol=tol)


def test_an_expanded_non_finite_gradient_is_still_skipped():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = DualOpt([p], lr=1e-2)
    p.grad = torch.tensor([float("nan")]).expand(5)
    opt.step()
    assert opt.skipped == 1 and torch.equal(p.detach(), torch.zeros(5))


def test_a_compiler_others_could_replace_is_not_run(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = tmp_path / "ran"
    cc = _script(shared / "cc", f"touch {marker}\nexec cc \"$@\"")
    got = _run(_env(tmp_path, CC=str(cc), DUALOPT_NATIVE_CACHE=str(_private_dir(tmp_path / "cache"))))
    assert not got["enabled"] and f"{shared} is writable by group or others" in got["reason"]
    assert "compiler" in got["reason"] and not marker.exists() and len(got["warnings"]) == 1
