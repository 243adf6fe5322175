"""One rank of a torch distributed test: ``python -m tests.torch._distributed_worker REQUEST.pkl ANSWER.pkl``.

The request names an engine and a list of jobs; every job builds its model and
optimizer from scratch, so the jobs of one request are independent and share
only the process group (one rendezvous per request keeps the suite fast).

Engines
-------
``single``  one process, no process group: the reference run.
``ddp``     ``DistributedDataParallel`` over gloo: every rank holds the whole
            model and a full optimizer; gradients are averaged by all-reduce.
``fsdp``    FSDP2 (``torch.distributed.fsdp.fully_shard`` per Linear and at
            the root) over gloo on CPU: every parameter is a ``DTensor``
            sharded on dim 0, so the optimizer sees shards.

The global batch is always the problem's (32 rows of
``dualopt.conformance.problem``); rank ``r`` of ``w`` trains on rows
``[r*32/w, (r+1)*32/w)`` of it with the mean loss over its rows, and both
engines average the gradients over ranks, so every engine computes the same
mean gradient up to rounding.

The ``single`` engine can also emulate the two-rank arithmetic in one
process (job key ``micro=2``, see :func:`backward`): the reference that DDP,
and FSDP2's reference path, must equal bit for bit.

Jobs (dicts): ``kind`` is ``train`` (initial weights, weights after every
epoch, state layout, how many tensors took the fast path's fused kernels),
``nan`` (a step with a non-finite gradient on one rank only), ``finite`` (the
skip decision for one hand-made sharded tensor) or ``checkpoint`` (save a
sharded checkpoint half way, resume it into a freshly built model and
optimizer, finish). Weights travel as float64 numpy arrays in Keras layout
(``dense_i/kernel`` is ``nn.Linear.weight`` transposed) under the problem's
names.
"""

from __future__ import annotations

import copy
import os
import pickle
import sys
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from dualopt.conformance.problem import EPS, LAYER_INDEX, NAMES, group_hyperparams, make_problem

torch.set_default_dtype(torch.float64)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "anchor")


# ----------------------------------------------------------------------------- setup
def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def initial_weights(model: str) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Layer sizes and float64 weights (Keras layout) of ``mlp`` (the conformance MLP) or ``wide``.

    ``wide`` (16-256-256-4) has a 256x256 kernel: at least ``FOLD_MIN_NUMEL``
    (2**15) elements, so DualOpt's fast path folds its scratch pull into the
    fused AdamW kernel and checks its gradient with a sum instead of the
    multi-tensor kernel. Both branches must work on shards.
    """
    if model == "mlp":
        return (16, 32, 32, 4), make_problem().weights
    sizes = (16, 256, 256, 4)
    rng = np.random.Generator(np.random.PCG64(7))
    weights = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weights[f"dense_{i}/kernel"] = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        weights[f"dense_{i}/bias"] = 0.1 * rng.standard_normal((fan_out,))
    return sizes, weights


def build_model(model: str, scale: float = 1.0) -> torch.nn.Module:
    """The MLP with the job's initial weights (times ``scale``: a *different* model to resume into)."""
    sizes, weights = initial_weights(model)
    layers: list[tuple[str, torch.nn.Module]] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = torch.nn.Linear(fan_in, fan_out, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(weights[f"dense_{i}/kernel"].T * scale))
            lin.bias.copy_(torch.from_numpy(weights[f"dense_{i}/bias"] * scale))
        layers.append((f"dense_{i}", lin))
        if i < len(sizes) - 2:
            layers.append((f"tanh_{i}", torch.nn.Tanh()))
    return torch.nn.Sequential(OrderedDict(layers))


def wrap(engine: str, model: torch.nn.Module) -> torch.nn.Module:
    """Apply the engine; returns the module to call (DDP wraps, FSDP2 shards in place)."""
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if engine == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (rank_world()[1],))
        for name, child in model.named_children():
            if name.startswith("dense_"):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def build_optimizer(model: torch.nn.Module, job: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    """DualOpt with the conformance problem's per-mode groups, or torch's own Adam (mode ``none``)."""
    named = list(model.named_parameters())
    if job["optimizer"] == "adam":
        assert job["mode"] == "none"
        return torch.optim.Adam([p for _, p in named], lr=lr, eps=EPS)
    from dualopt.torch import DualOpt

    hps = group_hyperparams(job["mode"])
    groups: list[dict[str, Any]] = []
    for (name, p), key, hp_name in zip(named, LAYER_INDEX, NAMES):
        hp = hps[hp_name]
        if not groups or groups[-1]["_hp"] != hp:
            groups.append({"_hp": hp, "params": [], "layer_index": []})
        groups[-1]["params"].append((name, p))
        groups[-1]["layer_index"].append(key)
    for g in groups:
        hp = g.pop("_hp")
        g.update(paradigm=hp.paradigm, weight_decay=hp.weight_decay, rollback_max=hp.rollback_max,
                 rollback_min=hp.rollback_min, rollback_power=hp.rollback_power)
    return DualOpt(groups, lr=lr, eps=EPS, foreach=job.get("foreach"))


def inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for (_, p), name in zip(inner(model).named_parameters(), NAMES):
        a = full(p.detach()).numpy().copy()
        out[name] = a.T if a.ndim == 2 else a
    return out


def local_snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every rank-local tensor the optimizer may touch (params and state), copied."""
    out = []
    for p in inner(model).parameters():
        out.append(local(p.detach()).clone())
        for key in STATE_KEYS:
            if key in opt.state.get(p, {}):
                out.append(local(opt.state[p][key]).clone())
    return out


# ----------------------------------------------------------------------------- training
class Data:
    """This rank's rows of every global batch of the conformance problem.

    ``micro`` (single process only) emulates ``micro`` ranks in one process:
    :func:`backward` then computes each emulated rank's gradient separately
    and combines them the way the engines do (see there).
    """

    def __init__(self, micro: int = 1) -> None:
        self.problem = make_problem()
        self.rank, self.world = rank_world()
        if micro != 1 and self.world != 1:
            raise ValueError(f"micro={micro} is invalid: expected 1 in a {self.world}-process run.")
        self.micro = micro
        self.per_rank = self.problem.batch_size // (self.world * micro)

    def batch(self, step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = step % self.problem.steps_per_epoch
        start = k * self.problem.batch_size + (self.rank if rank is None else rank) * self.per_rank
        rows = slice(start, start + self.per_rank)
        return torch.from_numpy(self.problem.x[rows]).clone(), torch.from_numpy(self.problem.y[rows])


def backward(model: torch.nn.Module, opt: torch.optim.Optimizer, data: Data, step: int,
             poison_input: bool = False) -> None:
    opt.zero_grad(set_to_none=True)
    if data.micro == 1:
        x, y = data.batch(step)
        if poison_input and data.rank == 0:
            x[0, 0] = float("nan")  # only rank 0's rows: the engine's reduction spreads it
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return
    # The engines' gradient, computed in one process: every rank's mean-loss
    # gradient times 1/world, summed over ranks. DDP multiplies each gradient
    # by 1/world as it copies it into its bucket, then all-reduces with SUM;
    # FSDP2 on float64 pre-divides by 2 and reduce-scatters with SUM
    # (torch.distributed.fsdp._fully_shard._fsdp_collectives._get_gradient_divide_factors).
    # With two ranks the sum of two numbers does not depend on their order and
    # the scaling by 1/2 is exact, so this is the engines' arithmetic bit for bit.
    params = list(model.parameters())
    scale = 1.0 / data.micro
    for r in range(data.micro):
        x, y = data.batch(step, rank=r)
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
        for p, g in zip(params, grads):
            g = g * scale
            p.grad = g if p.grad is None else p.grad + g


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: Data, start: int, stop: int,
                trajectory: list | None = None, poison_at: int | None = None) -> None:
    for step in range(start, stop):
        backward(model, opt, data, step, poison_input=(step == poison_at))
        opt.step()
        if trajectory is not None and (step + 1) % data.problem.steps_per_epoch == 0:
            trajectory.append(weights(model))


def state_layout(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """How every state tensor is laid out relative to its parameter (FSDP2: must be sharded alike)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for (pname, p), name in zip(inner(model).named_parameters(), NAMES):
        entries = {}
        for key in STATE_KEYS:
            s = opt.state.get(p, {}).get(key)
            if s is None:
                continue
            entry = {"dtensor": isinstance(s, DTensor), "param_dtensor": isinstance(p, DTensor),
                     "local_shape": tuple(local(s).shape), "param_local_shape": tuple(local(p).shape),
                     "dtype": str(s.dtype)}
            if isinstance(s, DTensor) and isinstance(p, DTensor):
                entry["same_placements"] = tuple(s.placements) == tuple(p.placements)
                entry["same_mesh"] = s.device_mesh == p.device_mesh
                entry["placements"] = str(tuple(s.placements))
            entries[key] = entry
        out[name] = entries
    return out


def anchors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    out = {}
    for p, name in zip(inner(model).parameters(), NAMES):
        a = opt.state.get(p, {}).get("anchor")
        if a is not None:
            arr = full(a).numpy().copy()
            out[name] = arr.T if arr.ndim == 2 else arr
    return out


# ----------------------------------------------------------------------------- jobs
def fast_path_use(opt: torch.optim.Optimizer) -> dict[str, int]:
    """How many tensors DualOpt's fast path sent through its fused kernels vs its reference loop.

    Reads the private ``_plans`` of :class:`dualopt.torch.DualOpt` (see
    ``backends/_torch_kernels.FastPlan``): a DTensor the fast path could not
    take would silently fall back to the loop, and only this shows it.
    """
    plans = getattr(opt, "_plans", None)
    if plans is None:
        return {}
    return {"fused": sum(len(b.idx) for plan in plans.values() for b in plan.buckets),
            "loop": sum(len(plan.loop) for plan in plans.values())}


def job_train(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    data = Data(micro=job.get("micro", 1))
    model = wrap(engine, build_model(job["model"]))
    opt = build_optimizer(inner(model), job, data.problem.lr)
    trajectory: list[dict[str, np.ndarray]] = []
    initial = weights(model)
    train_steps(model, opt, data, 0, job["steps"], trajectory)
    steps = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
    return {"initial": initial, "trajectory": trajectory, "layout": state_layout(model, opt),
            "anchors": anchors(model, opt), "steps": steps, "fast_path": fast_path_use(opt),
            "skipped": int(getattr(opt, "skipped", 0))}


def job_nan(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    """A step whose gradient is non-finite on one rank only must be skipped by *every* rank.

    ``where="input"``: a NaN in rank 0's input rows (the engine's gradient
    reduction spreads it). ``where="shard"``: one NaN written into rank 0's
    local shard of ``dense_1``'s gradient after the reduction, the case of an
    overflow that only one shard sees: the skip decision must still be global.
    """
    data = Data()
    model = wrap(engine, build_model(job["model"]))
    opt = build_optimizer(inner(model), job, data.problem.lr)
    train_steps(model, opt, data, 0, 3)
    before = local_snapshot(model, opt)
    backward(model, opt, data, 3, poison_input=job["where"] == "input")
    if job["where"] == "shard" and data.rank == 0:
        local(inner(model).dense_1.weight.grad)[0, 0] = float("nan")
    opt.step()
    after = local_snapshot(model, opt)
    unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    steps = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
    train_steps(model, opt, data, 4, 7)
    return {"skipped": int(opt.skipped), "unchanged": bool(unchanged), "steps_after_skip": steps,
            "final": weights(model)}


def job_finite(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    """The skip decision for one hand-made sharded parameter (``distribute_tensor``, ``Shard(0)``).

    One tensor per optimizer is the case where the core's check is a single
    reduction of a sharded gradient; ``large`` tensors (``FOLD_MIN_NUMEL``
    elements and more) take the fast path's sum-then-recheck branch. ``where``:
    no NaN, a NaN in rank 0's or in rank 1's shard, or ``overflow`` (finite
    gradients of 1e308 whose sum is inf: the step must be taken).
    Answers ``{(size, where, foreach): [skipped, step]}``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dualopt.torch import DualOpt

    rank, world = rank_world()
    mesh = init_device_mesh("cpu", (world,))
    shapes = {"small": (8, 4), "large": (512, 64)}
    out: dict[Any, list[int]] = {}
    for size, shape in shapes.items():
        for where in ("none", "rank0", "rank1", "overflow"):
            for foreach in (None, False):
                p = torch.nn.Parameter(distribute_tensor(torch.ones(shape), mesh, [Shard(0)]))
                opt = DualOpt([p], lr=0.1, paradigm="none", foreach=foreach)
                g = distribute_tensor(torch.full(shape, 1e308 if where == "overflow" else 1e-3), mesh, [Shard(0)])
                if where == f"rank{rank}":
                    g.to_local()[0, 0] = float("nan")
                p.grad = g
                opt.step()
                out[(size, where, foreach)] = [int(opt.skipped), int(opt.state[p].get("step", 0))]
    return out


def _clone_state(tree: Any) -> Any:
    """Deep copy of a state dict whose tensors may be DTensors (they alias the live optimizer state)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone_state(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone_state(v) for v in tree]
    return copy.deepcopy(tree)


def _tensor_leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a (nested or flattened) optimizer state dict's ``state``, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if prefix or k == "state" or str(k).startswith("state."):
                out.update(_tensor_leaves(v, key))
    return out


def job_checkpoint(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    """Train to ``half`` (one skipped step on the way), save the state, finish; resume a fresh copy, finish.

    Each ``api`` is a recipe of torch's docs, unchanged:

    - ``dcp``: ``get_state_dict`` -> ``torch.distributed.checkpoint.save``; then a
      freshly built model and optimizer -> ``get_state_dict`` (the load template)
      -> ``dcp.load`` -> ``set_state_dict``;
    - ``dcp-flattened``: the same with ``StateDictOptions(flatten_optimizer_state_dict=True)``
      (torchtitan's setting);
    - ``state_dict``: ``get_optimizer_state_dict`` / ``get_model_state_dict`` (sharded)
      kept in memory, given to ``set_optimizer_state_dict`` / ``set_model_state_dict``;
    - ``full_state_dict``: the same with ``StateDictOptions(full_state_dict=True)``
      (whole tensors on every rank, resharded on load).

    The fresh model starts from *other* weights (x0.5), so its own anchor
    snapshot differs: only a restored anchor gives the original trajectory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, get_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)

    api = job["api"]
    options = {"dcp-flattened": StateDictOptions(flatten_optimizer_state_dict=True),
               "full_state_dict": StateDictOptions(full_state_dict=True)}.get(api)
    data = Data()
    steps, half = job["steps"], job["steps"] // 2
    model = wrap(engine, build_model(job["model"]))
    opt = build_optimizer(inner(model), job, data.problem.lr)
    train_steps(model, opt, data, 0, half, poison_at=half // 2)
    saved_skipped = int(opt.skipped)
    ckpt_dir = job["dir"]
    if api.startswith("dcp"):
        msd, osd = get_state_dict(model, opt, options=options)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        kept = None
    else:
        osd = get_optimizer_state_dict(model, opt, options=options)
        kept = (_clone_state(get_model_state_dict(model, options=options)), _clone_state(osd))
    saved_layout = {path: (type(v).__name__, str(tuple(getattr(v, "placements", ()))), tuple(local(v).shape))
                    for path, v in _tensor_leaves(osd).items()}
    train_steps(model, opt, data, half, steps)
    out: dict[str, Any] = {"uninterrupted": weights(model), "saved_skipped": saved_skipped,
                           "saved_layout": saved_layout,
                           "files": sorted(os.listdir(ckpt_dir)) if api.startswith("dcp") else [],
                           "initial_anchors": {k: v for k, v in initial_weights(job["model"])[1].items()}}
    fresh = wrap(engine, build_model(job["model"], scale=0.5))
    fresh_opt = build_optimizer(inner(fresh), job, data.problem.lr)
    try:
        if api.startswith("dcp"):
            msd, osd = get_state_dict(fresh, fresh_opt, options=options)
            out["template_steps"] = sorted({int(s["step"]) for s in fresh_opt.state.values() if "step" in s})
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, checkpoint_id=ckpt_dir)
            set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=options)
        else:
            assert kept is not None
            set_model_state_dict(fresh, kept[0], options=options)
            set_optimizer_state_dict(fresh, fresh_opt, kept[1], options=options)
        out["resumed_skipped"] = int(fresh_opt.skipped)
        out["resumed_steps"] = sorted({int(s["step"]) for s in fresh_opt.state.values() if "step" in s})
        out["resumed_keys"] = sorted({k for s in fresh_opt.state.values() for k in s})
        train_steps(fresh, fresh_opt, data, half, steps)
        out["resumed"] = weights(fresh)
        out["resumed_anchors"] = anchors(fresh, fresh_opt)
        out["layout"] = state_layout(fresh, fresh_opt)
    except Exception:  # noqa: BLE001 - reported to the test, which shows it
        out["error"] = traceback.format_exc()
    return out


JOBS = {"train": job_train, "nan": job_nan, "finite": job_finite, "checkpoint": job_checkpoint}


def main(src: str, dst: str) -> None:
    with open(src, "rb") as fh:
        request = pickle.load(fh)
    engine = request["engine"]
    rank, world = rank_world()
    if engine != "single":
        import torch.distributed as dist

        store = os.environ["DUALOPT_DIST_STORE"]
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    answers: dict[str, Any] = {}
    for job in request["jobs"]:
        job = dict(job)
        if job["kind"] == "checkpoint":
            # one directory for all ranks, next to the store (the launcher deletes both)
            job["dir"] = os.environ["DUALOPT_DIST_STORE"] + f".{job['name']}.ckpt"
        answers[job["name"]] = JOBS[job["kind"]](engine, job)
    if engine != "single":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    with open(dst, "wb") as fh:
        pickle.dump({"rank": rank, "world": world, "torch": str(torch.__version__), "jobs": answers}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
