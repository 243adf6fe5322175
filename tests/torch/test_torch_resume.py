"""Kill-and-resume with ``dualopt.torch.DualOpt`` reproduces the uninterrupted run bit for bit.

The job (``_resume_job.py``) is a small MLP with a cosine LambdaLR schedule,
a tensor left without a gradient every fourth step and one skipped NaN step.
A resume at step k saves ``model``, ``optimizer`` and ``scheduler`` state dicts
with ``torch.save``, builds a *fresh* model, optimizer and scheduler, loads the
checkpoint with ``torch.load(weights_only=True)`` and continues: parameters,
every state tensor (moments, anchors, step counts and their dtypes), the skip
counter and the learning rate must equal the uninterrupted run's bits. Checked
in the scratch, finetune and mixed (finetune backbone, scratch head) modes, for
Adam and SGD, on the fast and the reference path, at steps 1, 2, 7 and 15 of
16 (48 resumes), plus bfloat16 params (float32 state must stay float32 through
torch's load-time cast) and two resumes in a genuinely new process after a
SIGKILL.

A state from another model, optimizer or format is refused with the spec's
message naming the offending parameter, and the refused load changes nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.torch import _resume_job as job  # noqa: E402
from tests.common.resume import assert_same  # noqa: E402
from dualopt.torch import STATE_FORMAT, DualOpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    # Tiny matmuls: on a loaded 2-core machine torch's thread pool makes them 30x slower. The worker
    # process uses one thread too, so both sides run the same kernels.
    yield

CONFIGS = [job.Config(mode, direction, foreach)
           for mode in job.MODES for direction in ("adam", "sgd") for foreach in (None, False)]


def _id(cfg: job.Config) -> str:
    return f"{cfg.mode}-{cfg.direction}-{'fast' if cfg.foreach is None else 'reference'}-{cfg.dtype}"


def uninterrupted(cfg: job.Config) -> dict[str, np.ndarray]:
    model, opt, sched = job.build(cfg)
    job.train(model, opt, sched, 0, job.N_STEPS)
    return job.snapshot(model, opt, sched)


def resumed(cfg: job.Config, at: int) -> dict[str, np.ndarray]:
    model, opt, sched = job.build(cfg)
    job.train(model, opt, sched, 0, at)
    blob = job.save(job.checkpoint(model, opt, sched, at))
    del model, opt, sched  # nothing of the first run survives but the bytes
    model, opt, sched, start = job.restore(cfg, job.load(blob))
    assert start == at
    job.train(model, opt, sched, start, job.N_STEPS)
    return job.snapshot(model, opt, sched)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_resume_at_any_step_is_bitwise(cfg):
    want = uninterrupted(cfg)
    # The run really exercised what the resume must carry.
    assert int(want["skipped"]) == 1
    steps = {k: int(v) for k, v in want.items() if k.startswith("state/") and k.endswith("/step")}
    assert steps["state/head.bias/step"] < steps["state/head.weight/step"] == job.N_STEPS - 1
    if cfg.mode != "scratch":
        assert any(k.endswith("/anchor") for k in want)
    for at in job.RESUME_AT:
        assert_same(resumed(cfg, at), want)


@pytest.mark.parametrize("foreach", [None, False], ids=["fast", "reference"])
def test_bfloat16_resume_keeps_float32_state(foreach):
    """torch's load_state_dict casts floating state to the param's dtype; DualOpt keeps it float32 (spec 6)."""
    cfg = job.Config("mixed", "adam", foreach, dtype="bfloat16")
    want = uninterrupted(cfg)
    dtypes = {k: str(v) for k, v in want.items() if k.startswith("dtype/")}
    assert dtypes and set(dtypes.values()) == {"torch.float32"}, dtypes
    for at in (1, 7):
        assert_same(resumed(cfg, at), want)


# --------------------------------------------------------------------------- a genuinely new process

def _worker(cfg: job.Config, ckpt: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.torch._resume_worker", json.dumps(cfg.as_dict()),
                           str(ckpt), str(out), str(kill_at)], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("cfg,kill_at", [
    pytest.param(job.Config("mixed", "adam"), 7, id="mixed-adam-fast-kill7"),
    # Each case costs two torch start-ups (5-25 s on a loaded 2-core machine): the second one is slow.
    pytest.param(job.Config("finetune", "sgd", False), 1, id="finetune-sgd-reference-kill1", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_in_a_new_process(tmp_path, cfg, kill_at):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "final.npz"
    killed = _worker(cfg, ckpt, out, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and not (tmp_path / "ckpt.pt.tmp").exists()
    assert job.load(str(ckpt))["step"] == kill_at
    done = _worker(cfg, ckpt, out, -1)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert_same(got, uninterrupted(cfg))


# --------------------------------------------------------------------------- states that must not load

def _state_of(cfg: job.Config, *, hidden: int = 8, steps: int = 3, **overrides) -> dict:
    model, opt, sched = job.build(cfg, hidden, **overrides)
    job.train(model, opt, sched, 0, steps)
    return job.load(job.save(opt.state_dict()))


def _plain_adam_state() -> dict:
    model, _, _ = job.build(job.Config("mixed"))
    opt = torch.optim.Adam(model.parameters(), lr=job.LR)
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    return job.load(job.save(opt.state_dict()))


def _without_tag() -> dict:
    sd = _state_of(job.Config("mixed"))
    for group in sd["param_groups"]:  # the format tag travels in every param group
        del group["dualopt"]
    return sd


def _other_tag() -> dict:
    sd = _state_of(job.Config("mixed"))
    sd["param_groups"][1]["dualopt"] = "dualopt.torch/0"
    return sd


def _more_tensors() -> dict:
    sd = _state_of(job.Config("mixed"))
    sd["param_groups"][0]["params"].append(99)
    return sd


BAD_STATES = {
    # name: (state factory, substrings the message must contain)
    "plain torch.optim.Adam": (_plain_adam_state, ["state_dict=", "['param_groups', 'state']", STATE_FORMAT]),
    "no format tag": (_without_tag, ["state_dict=", STATE_FORMAT, "another optimizer"]),
    "older format tag": (_other_tag, ["state_dict=", "param group 1 has 'dualopt': 'dualopt.torch/0'", STATE_FORMAT]),
    "other shapes": (lambda: _state_of(job.Config("mixed"), hidden=5),
                     ["'backbone.0.weight'", "shape (5, 6)", "shape (8, 6)"]),
    "other paradigm": (lambda: _state_of(job.Config("mixed"), head_paradigm="none"),
                       ["param group 1 with paradigm='none'", "paradigm='scratch'", "'head.weight'"]),
    "other group count": (lambda: _state_of(job.Config("finetune")), ["<1 param groups>", "2 param groups"]),
    "other direction": (lambda: _state_of(job.Config("mixed", "sgd")),
                        ["direction='sgd'", "direction='adam'", "'backbone.0.weight'"]),
    "other layer layout": (lambda: _state_of(job.Config("mixed"), layer_index=None),
                           ["layer_index", "'backbone.0.bias'"]),
    "other tensor count": (_more_tensors, ["5 tensors", "4 tensors in param group 0"]),
}


@pytest.mark.parametrize("name", BAD_STATES)
def test_state_of_another_model_or_format_is_refused(name):
    factory, expected = BAD_STATES[name]
    bad = factory()
    model, opt, sched = job.build(job.Config("mixed"))
    job.train(model, opt, sched, 0, 2)
    before = job.snapshot(model, opt, sched)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(bad)
    msg = str(info.value)
    assert msg.startswith("state_dict=") and " is invalid: expected " in msg, msg
    for part in expected:
        assert part in msg, (part, msg)
    # The refused load touched nothing, and training goes on exactly as without the attempt.
    assert_same(job.snapshot(model, opt, sched), before)
    job.train(model, opt, sched, 2, job.N_STEPS)
    assert_same(job.snapshot(model, opt, sched), uninterrupted(job.Config("mixed")))
