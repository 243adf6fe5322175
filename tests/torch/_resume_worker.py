"""A torch training process that checkpoints after every step and can be killed at a chosen step.

``python -m tests.torch._resume_worker CONFIG_JSON CKPT OUT KILL_AT``

- If ``CKPT`` exists the job resumes from it (fresh model, optimizer and
  scheduler, then ``load_state_dict`` from ``torch.load(weights_only=True)``),
  otherwise it starts at step 0.
- After every step it writes ``CKPT`` atomically (``torch.save`` to a temporary
  file, then ``os.replace``), as a real job would.
- ``KILL_AT > 0``: right after writing the checkpoint of that step the process
  sends itself SIGKILL (no cleanup, no atexit: what a pre-empted job sees).
- On reaching the end it writes :func:`tests.torch._resume_job.snapshot` to ``OUT`` (npz).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from tests.torch import _resume_job as job


def main(config_json: str, ckpt: str, out: str, kill_at: int) -> None:
    job.torch.set_num_threads(1)  # as the pytest side does
    cfg = job.Config(**json.loads(config_json))
    if os.path.exists(ckpt):
        model, opt, sched, start = job.restore(cfg, job.load(ckpt))
    else:
        (model, opt, sched), start = job.build(cfg), 0
    data = job.batches()
    for k in range(start, job.N_STEPS):
        job.train_step(model, opt, sched, data[k], k)
        job.save(job.checkpoint(model, opt, sched, k + 1), ckpt)
        if k + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    np.savez(out, **job.snapshot(model, opt, sched))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
