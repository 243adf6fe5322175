"""Kill-and-resume with ``dualopt.keras.DualOpt`` reproduces the uninterrupted run bit for bit.

Runs ``_resume_checks.py`` in subprocesses (``_launcher.launch``), one Keras backend per
process (jax in the default run; tensorflow and torch, and jax's extra
resumes, are ``slow``). Resumes checked (every model weight and every
optimizer variable — iterations, t, skipped, layout, moments, anchors —
compared bit for bit with the uninterrupted run):

- ``model.save(".keras")`` + ``keras.models.load_model`` between
  ``train_on_batch`` calls, at steps 1, 2, 7 and 15 of 16, scratch /
  finetune / mixed, Adam / SGD (default run: 4 resumes; all levels: 14);
- ``ModelCheckpoint`` ``.keras`` files + ``load_model`` + ``fit(initial_epoch=k)``,
  ``ModelCheckpoint(save_weights_only=True)`` + ``load_weights`` (optimizer
  built first, as ``BackupAndRestore`` does) and ``BackupAndRestore`` after an
  interrupted ``fit`` (default: 3; all levels: 10);
- a ``fit`` job SIGKILLed right after its epoch-2 backups, resumed in a new
  process (the one that then runs the other checks; its first action)
  both through ``BackupAndRestore`` and from the ``ModelCheckpoint`` file
  (2 per backend).

Optimizer state of another layout (Keras's Adam, other paradigms, other layer
numbering, another direction) is refused through ``load_weights`` and
``BackupAndRestore`` with DualOpt's message naming the offending variable, and
the refused load leaves the optimizer untouched.
"""

from __future__ import annotations

import functools
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.common.resume import differences
from tests.keras._launcher import backend_marks, launch, pick, reliability_env

CHECKS = "tests.keras._resume_checks"
KILL_EPOCH = 2


def _params(default_level: str = "default") -> list:
    out = [pytest.param("jax", default_level, marks=backend_marks("jax"), id="jax")]
    out.append(pytest.param("jax", "extra", marks=backend_marks("jax") + [pytest.mark.slow], id="jax-extra"))
    for b in ("tensorflow", "torch"):
        out.append(pytest.param(b, "all", marks=backend_marks(b), id=b))
    return out


@functools.lru_cache(maxsize=None)
def _run(backend: str, level: str) -> dict:
    """The kill job (killed), then the worker's ``checks`` in a new process, which first resumes the killed
    job from its files and then runs the in-process checks (``extra``: the checks only)."""
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    env = reliability_env()
    with tempfile.TemporaryDirectory(prefix=f"dualopt-resume-keras-{backend}-") as tmp:
        job = Path(tmp) / "job"
        job.mkdir()
        kill = None
        if level != "extra":
            killed = launch(backend, f"{CHECKS}:train", str(job), KILL_EPOCH, env=env, timeout=600)
            kill = {"returncode": killed.returncode, "stderr": killed.stderr[-3000:],
                    "files": sorted(p.name for p in job.iterdir())}
        args = [tmp, level] + ([str(job)] if level != "extra" else [])
        proc = launch(backend, f"{CHECKS}:checks", *args, env=env, timeout=1200)
        if proc.returncode != 0 or proc.result is None:
            return {"__crash__": f"checks rc={proc.returncode}\n{proc.stderr}"}
        results = proc.result
        if kill is None:
            return results
        results["kill"] = kill
        want = _load(Path(tmp) / "uninterrupted.npz")
        for name in ("backup", "checkpoint"):
            path = job / f"resumed_{name}.npz"
            results[f"new_process_{name}"] = differences(_load(path), want) if path.exists() else ["<missing>"]
        return results


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def result(backend: str, level: str, check: str):
    return pick(_run(backend, level), check)


EXPECTED_COUNTS = {"default": (4, 3), "extra": (10, 7), "all": (14, 10)}  # (.keras between batches, callbacks)


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend,level", _params())
def test_keras_file_resumes_are_bitwise(backend, level):
    rows = result(backend, level, "keras_file_train_on_batch")
    assert len(rows) == EXPECTED_COUNTS[level][0]
    for row in rows:
        assert row["optimizer"] == "DualOpt", row
        assert row["differing"] == [], row
        assert row["skipped"] == 1 and row["step_count"] == 15, row  # the NaN step stayed skipped
        assert row["n_values"] >= 16, row


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend,level", _params())
def test_checkpoint_callback_resumes_are_bitwise(backend, level):
    rows = result(backend, level, "checkpoint_callbacks")
    assert len(rows) == EXPECTED_COUNTS[level][1]
    kinds = {r["resume"].split(" ", 1)[1].split("@")[0] for r in rows}
    assert kinds == {"ModelCheckpoint(.keras)", "ModelCheckpoint(weights)", "BackupAndRestore"}
    for row in rows:
        assert row["differing"] == [], row


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend,level", [p for p in _params() if p.values[1] != "extra"])
def test_sigkill_then_resume_in_a_new_process(backend, level):
    kill = result(backend, level, "kill")
    assert kill["returncode"] == -signal.SIGKILL, kill["stderr"]
    assert f"e{KILL_EPOCH}.keras" in kill["files"] and f"e{KILL_EPOCH + 1}.keras" not in kill["files"], kill
    assert "backup" in kill["files"]
    assert result(backend, level, "resume_process") == {"ok": True}
    assert result(backend, level, "new_process_backup") == []
    assert result(backend, level, "new_process_checkpoint") == []


REFUSED = {
    # source of the optimizer state: substrings of the message
    "keras Adam": ["optimizer state='<14 variables>' is invalid: expected the 20 variables of this DualOpt's layout"],
    "other paradigms": ["optimizer state for 'backbone_0/kernel'='<scratch layer 0>' is invalid: "
                        "expected finetune layer 0"],
    "other layer layout": ["optimizer state for 'backbone_0/bias'='<finetune layer 1>' is invalid: "
                           "expected finetune layer 0"],
    "other direction": ["optimizer state='<14 variables>' is invalid: expected the 20 variables"],
    "BackupAndRestore other paradigms": ["optimizer state for 'backbone_0/kernel'='<scratch layer 0>' is invalid"],
}


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend,level", [p for p in _params() if p.values[1] != "extra"])
def test_state_of_another_layout_is_refused(backend, level):
    out = result(backend, level, "refused_states")
    for name, parts in REFUSED.items():
        msg = out[name]["message"]
        assert msg is not None and msg.startswith("ValueError: "), (name, msg)
        for part in parts:
            assert part in msg, (name, part, msg)
        if "optimizer_untouched" in out[name]:
            assert out[name]["optimizer_untouched"], name
    # A model of other shapes fails in Keras's own layer loading, loudly.
    msg = out["other shapes"]["message"]
    assert msg is not None and "backbone_0/kernel" in msg and "6, 5" in msg, msg  # torch prints Size([6, 5])
    # load_weights before the optimizer exists (compile -> load_weights -> fit): Keras's own optimizers
    # drop the state with a warning; DualOpt restores all of it when it is built (issue 19 R5) ...
    unbuilt = out["load_weights before build"]
    assert not unbuilt["optimizer_built"] and unbuilt["warnings"] == [], unbuilt
    assert unbuilt["differing"] == [], unbuilt
    # ... and refuses, when it is built, a state of another layout, saying what to do instead.
    msg = out["load_weights before build, other direction"]["message"]
    assert msg is not None and "optimizer state='<20 variables>' is invalid: expected the 14 variables" in msg, msg
    assert "load the weights before compile()" in msg, msg
