"""An Optax training process that checkpoints after every step and can be killed at a chosen step.

``python -m tests.optax._resume_worker CONFIG_JSON CKPT OUT KILL_AT``: like
``tests/torch/_resume_worker.py``. If ``CKPT`` (an ``.npz``) exists the job restores
params and state into the templates of a freshly built transform
(``jax.eval_shape`` of ``tx.init``) and continues; after every step it writes
``CKPT`` atomically; ``KILL_AT > 0`` sends SIGKILL to itself right after that
step's checkpoint; at the end it writes :func:`tests.optax._resume_job.snapshot` to ``OUT``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

from tests.optax import _resume_job as job


def main(config_json: str, ckpt: str, out: str, kill_at: int) -> None:
    cfg = job.Config(**json.loads(config_json))
    tx = job.make_tx(cfg)
    if os.path.exists(ckpt):
        arrays, start = job.read(ckpt)
        params, state = job.restore_into(arrays, *job.templates(tx, cfg))
    else:
        params = job.init_params(cfg)
        state, start = tx.init(params), 0
    step = job.make_step(tx)
    data = job.batches()
    for k in range(start, job.N_STEPS):
        params, state = job.train(step, params, state, k, k + 1, data)
        job.save(ckpt, params, state, k + 1)
        if k + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    np.savez(out, **job.snapshot(params, state))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
