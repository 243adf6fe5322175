"""Kill-and-resume with ``dualopt.optax.dualopt`` reproduces the uninterrupted run bit for bit.

The job (``_resume_job.py``): a jitted ``tx.update`` + ``optax.apply_updates``
step on a small MLP, a cosine schedule read from the state's ``count``, one
skipped NaN step; x64 off. A resume at step k writes every leaf of
``(params, state)`` to a pickle-free ``.npz`` and restores it into the
templates of a freshly built transform (``jax.eval_shape(tx.init, ...)``), a
fresh jitted step included. Checked for scratch, finetune and mixed
(finetune backbone, scratch head) with Adam and SGD at steps 1, 2, 7 and 15 of
16 (24 resumes), bfloat16 params at 2 steps (float32 state), a restore
without a template, and one resume in a new process after a SIGKILL.

A state of another model, other settings or another transform is refused by
``tx.update`` (eagerly and under ``jax.jit``) with the spec's message naming
the offending leaf.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from tests.optax import _resume_job as job  # noqa: E402
from tests.common.resume import assert_same  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [job.Config(mode, direction) for mode in job.MODES for direction in ("adam", "sgd")]


@pytest.fixture(autouse=True)
def _float32_jax():
    # x64 off, as most users run (a context manager: other suites in this process keep their setting).
    with jax.enable_x64(False):
        yield


def _id(cfg: job.Config) -> str:
    return f"{cfg.mode}-{cfg.direction}-{cfg.dtype}"


def uninterrupted(cfg: job.Config) -> dict[str, np.ndarray]:
    tx = job.make_tx(cfg)
    params = job.init_params(cfg)
    params, state = job.train(job.compiled_step(cfg), params, tx.init(params), 0, job.N_STEPS)
    return job.snapshot(params, state)


def resumed(cfg: job.Config, at: int, path: Path, *, with_template: bool = True) -> dict[str, np.ndarray]:
    tx = job.make_tx(cfg)
    params = job.init_params(cfg)
    params, state = job.train(job.compiled_step(cfg), params, tx.init(params), 0, at)
    job.save(str(path), params, state, at)
    del tx, params, state
    # A new transform and arrays read from the file. The jitted step is a pure function of its
    # arguments and is reused (compiling costs seconds); the subprocess test below starts from nothing.
    tx = job.make_tx(cfg)
    arrays, start = job.read(str(path))
    if with_template:
        params, state = job.restore_into(arrays, *job.templates(tx, cfg))
    else:
        params, state = job.restore_as_saved(arrays)
    assert start == at
    params, state = job.train(job.compiled_step(cfg), params, state, start, job.N_STEPS)
    return job.snapshot(params, state)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_resume_at_any_step_is_bitwise(cfg, tmp_path):
    want = uninterrupted(cfg)
    assert int(want["state/skipped"]) == 1 and int(want["state/count"]) == job.N_STEPS - 1
    has_anchor = any(k.startswith("state/anchor/") and want[k].size for k in want)
    assert has_anchor == (cfg.mode != "scratch")
    for at in job.RESUME_AT:
        assert_same(resumed(cfg, at, tmp_path / f"at{at}.npz"), want)


def test_resume_without_a_template_is_bitwise(tmp_path):
    cfg = job.Config("mixed", "adam")
    assert_same(resumed(cfg, 7, tmp_path / "ckpt.npz", with_template=False), uninterrupted(cfg))


def test_bfloat16_resume_keeps_float32_state(tmp_path):
    cfg = job.Config("mixed", "adam", dtype="bfloat16")
    want = uninterrupted(cfg)
    state_dtypes = {want[k].item() for k in want if k.startswith("dtype/state/") and not k.endswith(("count", "skipped"))}
    param_dtypes = {want[k].item() for k in want if k.startswith("dtype/params/")}
    assert state_dtypes == {"float32"} and param_dtypes == {"bfloat16"}
    for at in (1, 7):
        assert_same(resumed(cfg, at, tmp_path / f"at{at}.npz"), want)


def _worker(cfg: job.Config, ckpt: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run([sys.executable, "-m", "tests.optax._resume_worker", json.dumps(cfg.as_dict()),
                           str(ckpt), str(out), str(kill_at)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_sigkill_then_resume_in_a_new_process(tmp_path):
    cfg = job.Config("mixed", "adam")
    ckpt, out = tmp_path / "ckpt.npz", tmp_path / "final.npz"
    killed = _worker(cfg, ckpt, out, 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and job.read(str(ckpt))[1] == 7
    done = _worker(cfg, ckpt, out, -1)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert_same(got, uninterrupted(cfg))


# --------------------------------------------------------------------------- states that must not load

def _saved_state(tmp_path: Path, cfg: job.Config, widths=None):
    """The other setup's state (as ``init`` makes it: its layout is what matters), saved and restored
    *as saved* (no template to hide a mismatch)."""
    tx = job.make_tx(cfg)
    params = job.init_params(cfg, widths)
    job.save(str(tmp_path / "other.npz"), params, tx.init(params), 0)
    return job.restore_as_saved(job.read(str(tmp_path / "other.npz"))[0])[1]


def _cast_state(tmp_path: Path):
    state = _saved_state(tmp_path, job.Config("mixed"))
    return state._replace(mu=jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.mu))


def _without_layer(tmp_path: Path):
    return _saved_state(tmp_path, job.Config("mixed"), widths={"Dense_0": (6, 8), "Dense_1": (8, 8)})


BAD_STATES = {
    "optax.adam": (lambda tmp: optax.adam(0.1).init(job.init_params(job.Config())),
                   ["state='<tuple>'", "DualOptState", "another optax transform"]),
    "optax.chain": (lambda tmp: optax.chain(optax.clip(1.0), optax.adamw(0.1)).init(job.init_params(job.Config())),
                    ["state='<tuple>'", "DualOptState"]),
    "other shapes": (lambda tmp: _saved_state(tmp, job.Config(), {"Dense_0": (6, 8), "Dense_1": (8, 5), "Dense_10": (5, 8)}),
                     ["state.mu['backbone/Dense_1/bias']", "shape (5,)", "expected shape (8,)"]),
    "missing layer": (_without_layer, ["state.mu=", "without the param 'backbone/Dense_10/bias'"]),
    "other paradigms": (lambda tmp: _saved_state(tmp, job.Config("scratch")),
                        ["state.anchor=", "without the finetune param 'backbone/Dense_0/bias'"]),
    "other direction": (lambda tmp: _saved_state(tmp, job.Config("mixed", "sgd")),
                        ["state.nu['backbone/Dense_0/bias']", "shape (0,)", "direction='adam'"]),
    "state cast to bfloat16": (_cast_state, ["state.mu['backbone/Dense_0/bias']", "dtype bfloat16", "dtype float32"]),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", BAD_STATES)
def test_state_of_another_model_or_transform_is_refused(name, jit, tmp_path):
    factory, expected = BAD_STATES[name]
    bad = factory(tmp_path)
    cfg = job.Config("mixed")
    tx = job.make_tx(cfg)
    params = job.init_params(cfg)
    grads = jax.tree.map(jnp.ones_like, params)
    update = lambda p, s: tx.update(grads, s, p)  # noqa: E731
    with pytest.raises(ValueError) as info:
        (jax.jit(update) if jit else update)(params, bad)
    msg = str(info.value)
    assert " is invalid: expected " in msg, msg
    for part in expected:
        assert part in msg, (part, msg)
    # The right state still works with the same transform.
    updates, state = jax.jit(update)(params, tx.init(params))
    assert int(state.count) == 1 and all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
