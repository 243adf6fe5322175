"""Keras resume checks, run in a subprocess with ``KERAS_BACKEND`` set (one backend per process).

Functions (each launched by ``test_keras_resume.py`` through ``_launcher.launch``):

- ``checks(TMPDIR, LEVEL)``: the in-process resumes of ``LEVEL`` (``default``,
  ``extra`` or ``all``, see ``TRAIN_ON_BATCH_RESUMES``) and every refused state;
  returns measured values (bitwise flags, the names of differing variables,
  messages) and writes the uninterrupted run of the kill job to
  ``TMPDIR/uninterrupted.npz``. The pytest side decides pass or fail.
- ``checks(TMPDIR, LEVEL, JOBDIR)``: first resume the killed job of ``JOBDIR``
  (``resume``, below), then the checks.
- ``train(TMPDIR, KILL_EPOCH)``: the kill job: ``fit`` with
  ``BackupAndRestore`` and a ``ModelCheckpoint`` writing ``.keras`` files;
  right after the backups of epoch ``KILL_EPOCH`` the process sends itself
  SIGKILL.
- ``resume(TMPDIR, KILL_EPOCH)``: in a new process, resume that job twice: with
  the same ``BackupAndRestore`` (a plain ``fit`` call picks it up) and from
  the ``ModelCheckpoint`` file (``load_model`` + ``fit(initial_epoch=...)``);
  writes ``TMPDIR/resumed_backup.npz`` and ``TMPDIR/resumed_checkpoint.npz``.

The job: a 6-8-8-3 tanh MLP (``backbone_0``, ``backbone_1``, ``head``),
sparse cross-entropy on fixed data, a ``CosineDecay`` learning rate (so the
``iterations`` counter must resume too) and one batch holding a NaN (its
update is skipped and counted in ``skipped``). float32, as Keras defaults.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

import keras  # backend chosen by KERAS_BACKEND
import numpy as np
from keras import ops

from dualopt.keras import DualOpt
from tests.common.resume import differences
from tests.keras._launcher import run_named

BACKEND = keras.backend.backend()
B, N_BATCHES, EPOCHS = 16, 4, 4  # fit jobs: 4 epochs of 4 batches
N_STEPS = 16  # train_on_batch jobs
RESUME_AT = (1, 2, 7, 15)
LR = 0.02
NAN_BATCH = 1  # batch whose inputs hold a NaN: step 2 of train_on_batch jobs, batch 2 of every fit epoch
CONFIGS = {f"{m}-{d}": (m, d) for m in ("scratch", "finetune", "mixed") for d in ("adam", "sgd")}
# Which resumes run. Each one recompiles the train step (about 1 s of CPU here, several seconds of wall
# time on a loaded machine), so the default run (jax) checks a subset that still covers every paradigm
# and both directions, steps 1, 2, 7 and 15 and every checkpoint mechanism; "extra" (slow) adds the rest.
TRAIN_ON_BATCH_RESUMES = {
    "default": {"mixed-adam": (1, 7), "finetune-sgd": (15,), "scratch-adam": (2,)},
    "extra": {"mixed-adam": (2, 15), "mixed-sgd": (2, 7), "scratch-adam": (15,), "scratch-sgd": (1, 7),
              "finetune-adam": (1, 15), "finetune-sgd": (2,)},
}
CALLBACK_RESUMES = {  # configuration -> ModelCheckpoint(.keras) epochs
    "default": {"mixed-adam": (1,)},
    "extra": {"finetune-sgd": (1, 2), "scratch-adam": (2,)},
}
RESULTS: dict[str, Any] = {"backend": BACKEND, "seconds": {}}
CHECKS: dict[str, Callable[[], Any]] = {}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    CHECKS[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------------------------------------ the job
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_STEPS * B, 6)).astype("float32")
    x[NAN_BATCH * B + 3, 1] = np.nan
    return x, rng.integers(0, 3, N_STEPS * B).astype("int32")


def optimizer(mode: str, direction: str, **overrides: Any) -> DualOpt:
    kw: dict[str, Any] = dict(direction=direction, momentum=0.9, nesterov=direction == "sgd", weight_decay=0.5,
                              rollback_max=20.0, rollback_min=1.0, layer_index="layer")
    kw.update({"scratch": dict(paradigm="scratch"), "finetune": dict(paradigm="finetune"),
               "mixed": dict(paradigm={"head": "scratch"}, default_paradigm="finetune")}[mode])
    kw.update(overrides)
    return DualOpt(keras.optimizers.schedules.CosineDecay(LR, N_STEPS, alpha=0.1), **kw)


def model(mode: str = "mixed", direction: str = "adam", hidden: int = 8, opt: Any = None) -> Any:
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="backbone_0")(inp)
    h = keras.layers.Dense(hidden, activation="tanh", name="backbone_1")(h)
    m = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    # The same "pretrained" weights in every process, from numpy (keras.utils.set_random_seed would
    # import tensorflow, seconds of start-up on the other backends).
    rng = np.random.default_rng(1)
    for v in m.weights:
        v.assign((rng.standard_normal(tuple(v.shape)) / np.sqrt(v.shape[0])).astype("float32"))
    m.compile(optimizer=opt if opt is not None else optimizer(mode, direction),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def train_batches(m: Any, start: int, stop: int) -> None:
    x, y = data()
    for k in range(start, stop):
        m.train_on_batch(x[k * B:(k + 1) * B], y[k * B:(k + 1) * B])


def fit(m: Any, epochs: int, initial_epoch: int = 0, callbacks: list | None = None) -> None:
    x, y = data()
    m.fit(x[:N_BATCHES * B], y[:N_BATCHES * B], batch_size=B, epochs=epochs,
          initial_epoch=initial_epoch, shuffle=False, verbose=0, callbacks=callbacks or [])


def snapshot(m: Any) -> dict[str, np.ndarray]:
    """Model weights and every optimizer variable (iterations, step, skipped, layout, moments, anchors)."""
    out = {f"weight/{v.path}": np.array(ops.convert_to_numpy(v)) for v in m.weights}
    for i, v in enumerate(m.optimizer.variables):
        # Relative to the optimizer's name: each DualOpt gets Keras's automatic unique name.
        out[f"optimizer/{i}/{v.path.removeprefix(m.optimizer.name + '/')}"] = np.array(ops.convert_to_numpy(v))
    return out


def compared(name: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"resume": name, "differing": differences(got, want), "n_values": len(want)}


def save_npz(path: str, snap: dict[str, np.ndarray]) -> None:
    np.savez(path, **{k.replace("/", "|"): v for k, v in snap.items()})


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def tmpdir() -> str:
    return tempfile.mkdtemp(dir=os.environ["DUALOPT_RESUME_TMP"])


# ------------------------------------------------------------------------------------------------ checks
def selected(table: dict[str, dict[str, tuple]]) -> dict[str, list]:
    levels = ("default", "extra") if LEVEL == "all" else (LEVEL,)
    out: dict[str, list] = {}
    for level in levels:
        for name, points in table[level].items():
            out.setdefault(name, []).extend(points)
    return out


@check
def keras_file_train_on_batch() -> list[dict[str, Any]]:
    """train_on_batch k steps, ``model.save(.keras)``, ``load_model``, continue == never stopping."""
    out = []
    for name, points in selected(TRAIN_ON_BATCH_RESUMES).items():
        mode, direction = CONFIGS[name]
        straight = model(mode, direction)
        train_batches(straight, 0, N_STEPS)
        want = snapshot(straight)
        for at in points:
            first = model(mode, direction)
            train_batches(first, 0, at)
            path = os.path.join(tmpdir(), "model.keras")
            first.save(path)
            del first
            loaded = keras.models.load_model(path)
            kind = type(loaded.optimizer).__name__
            train_batches(loaded, at, N_STEPS)
            out.append({**compared(f"{name}@{at}", snapshot(loaded), want), "optimizer": kind,
                        "skipped": int(ops.convert_to_numpy(loaded.optimizer.skipped)),
                        "step_count": int(ops.convert_to_numpy(loaded.optimizer.step_count))})
    return out


class Interrupt(keras.callbacks.Callback):
    """Stops ``fit`` with an exception after epoch ``at`` (after the callbacks before it have saved)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch + 1 == self.at:
            raise RuntimeError(f"interrupted after epoch {self.at}")


@check
def checkpoint_callbacks() -> list[dict[str, Any]]:
    """ModelCheckpoint (.keras and weights-only) and BackupAndRestore resumes of fit, in this process."""
    out = []
    for name, points in selected(CALLBACK_RESUMES).items():
        mode, direction = CONFIGS[name]
        straight = model(mode, direction)
        fit(straight, EPOCHS)
        want = snapshot(straight)
        d = tmpdir()
        first = model(mode, direction)
        fit(first, EPOCHS, callbacks=[
            keras.callbacks.ModelCheckpoint(os.path.join(d, "e{epoch}.keras")),
            keras.callbacks.ModelCheckpoint(os.path.join(d, "e{epoch}.weights.h5"), save_weights_only=True)])
        for at in points:
            loaded = keras.models.load_model(os.path.join(d, f"e{at}.keras"))
            fit(loaded, EPOCHS, initial_epoch=at)
            out.append(compared(f"{name} ModelCheckpoint(.keras)@epoch{at}", snapshot(loaded), want))
        # Weights only: rebuild and compile as at the start, build the optimizer (as BackupAndRestore
        # does) so that load_weights has slots to fill, then continue.
        again = model(mode, direction)
        again.optimizer.build(again.trainable_variables)
        again.load_weights(os.path.join(d, "e2.weights.h5"))
        fit(again, EPOCHS, initial_epoch=2)
        out.append(compared(f"{name} ModelCheckpoint(weights)@epoch2", snapshot(again), want))
        # BackupAndRestore: interrupted by an exception after epoch 2, then a new model and a plain fit.
        backup = os.path.join(d, "backup")
        interrupted = model(mode, direction)
        try:
            fit(interrupted, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(2)])
        except RuntimeError:
            pass
        resumed = model(mode, direction)
        fit(resumed, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(backup)])
        out.append(compared(f"{name} BackupAndRestore@epoch2", snapshot(resumed), want))
    return out


def _message(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except Exception as e:  # recorded and asserted on by pytest
        return f"{type(e).__name__}: {e}"
    return None


@check
def refused_states() -> dict[str, Any]:
    """Optimizer state of another layout loaded through load_weights / BackupAndRestore: messages."""
    d = tmpdir()
    sources = {
        "keras Adam": model(opt=keras.optimizers.Adam(LR)),
        "other paradigms": model(opt=optimizer("mixed", "adam", paradigm={"backbone_0": "scratch"})),
        "other layer layout": model(opt=optimizer("mixed", "adam", layer_index=None)),
        "other direction": model(opt=optimizer("mixed", "sgd")),
        "other shapes": model(hidden=5),
    }
    out: dict[str, Any] = {}
    for name, src in sources.items():
        src.optimizer.build(src.trainable_variables)  # its layout is what matters; no training (no compile)
        path = os.path.join(d, f"{name.replace(' ', '_')}.weights.h5")
        src.save_weights(path)
        target = model("mixed", "adam")
        target.optimizer.build(target.trainable_variables)
        before = snapshot(target)
        out[name] = {"message": _message(lambda: target.load_weights(path))}
        # A refused optimizer state leaves the optimizer as it was (the model's weights are Keras's
        # business: they load before the optimizer fails).
        after = snapshot(target)
        out[name]["optimizer_untouched"] = not [k for k in differences(after, before) if k.startswith("optimizer/")]
    # BackupAndRestore picking up a backup written with other paradigms.
    backup = os.path.join(d, "backup")
    src = model(opt=optimizer("mixed", "adam", paradigm={"backbone_0": "scratch"}))
    try:
        fit(src, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(1)])
    except RuntimeError:
        pass
    out["BackupAndRestore other paradigms"] = {
        "message": _message(lambda: fit(model("mixed", "adam"), EPOCHS,
                                        callbacks=[keras.callbacks.BackupAndRestore(backup)]))}
    # load_weights before the optimizer is built (compile -> load_weights -> fit): DualOpt keeps the
    # state and restores it when it is built; one of another layout is refused then.
    src = model("mixed", "adam")
    train_batches(src, 0, 3)
    path = os.path.join(d, "unbuilt.weights.h5")
    src.save_weights(path)
    target = model("mixed", "adam")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_weights(path)
    built = bool(target.optimizer.built)
    target.optimizer.build(target.trainable_variables)
    out["load_weights before build"] = {"warnings": [str(w.message) for w in caught], "optimizer_built": built,
                                        "differing": differences(snapshot(target), snapshot(src))}
    other = model("mixed", "sgd")
    other.load_weights(path)
    out["load_weights before build, other direction"] = {
        "message": _message(lambda: other.optimizer.build(other.trainable_variables))}
    return out


LEVEL = "default"


def checks(tmp: str, level: str, job_dir: str | None = None) -> dict[str, Any]:
    """The checks of ``level``, after resuming the killed job of ``job_dir`` (module docstring)."""
    global LEVEL
    LEVEL = level
    os.environ["DUALOPT_RESUME_TMP"] = tmp
    if job_dir is not None:
        # First thing in this process, which has never seen the killed job: resume it from its files.
        t0 = time.perf_counter()
        try:
            resume(job_dir, KILL_EPOCH)
            RESULTS["resume_process"] = {"ok": True}
        except Exception:
            RESULTS["resume_process"] = {"__error__": traceback.format_exc()[-4000:]}
        RESULTS["seconds"]["resume_killed_job"] = round(time.perf_counter() - t0, 2)
    done = run_named(BACKEND, [(name, fn) for name, fn in CHECKS.items()
                               if not (level == "extra" and name == "refused_states")])
    RESULTS["seconds"].update(done.pop("seconds"))
    done.pop("backend")
    RESULTS.update(done)
    if level == "extra":
        return RESULTS
    # The uninterrupted kill job, for the pytest side to compare the new process's resumes with.
    t0 = time.perf_counter()
    straight = model(*KILL_JOB)
    fit(straight, EPOCHS)
    save_npz(os.path.join(tmp, "uninterrupted.npz"), snapshot(straight))
    RESULTS["seconds"]["uninterrupted"] = round(time.perf_counter() - t0, 2)
    return RESULTS


# ------------------------------------------------------------------------------------------------ kill job
KILL_JOB = ("mixed", "adam")
KILL_EPOCH = 2


class Kill(keras.callbacks.Callback):
    """SIGKILL right after the callbacks listed before this one have written epoch ``at``'s files."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch + 1 == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def train(tmp: str, kill_epoch: int) -> None:
    m = model(*KILL_JOB)
    fit(m, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(os.path.join(tmp, "backup")),
                              keras.callbacks.ModelCheckpoint(os.path.join(tmp, "e{epoch}.keras")), Kill(kill_epoch)])
    raise SystemExit("the kill job was not killed")


def resume(tmp: str, kill_epoch: int) -> None:
    m = model(*KILL_JOB)
    fit(m, EPOCHS, callbacks=[keras.callbacks.BackupAndRestore(os.path.join(tmp, "backup"))])
    save_npz(os.path.join(tmp, "resumed_backup.npz"), snapshot(m))
    m = keras.models.load_model(os.path.join(tmp, f"e{kill_epoch}.keras"))
    fit(m, EPOCHS, initial_epoch=kill_epoch)
    save_npz(os.path.join(tmp, "resumed_checkpoint.npz"), snapshot(m))

